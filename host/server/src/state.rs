//! What the sidecar serves, and every way to change it while it serves: policies, data,
//! shadows, revocations, keys. The admin API, the policy directory and the JWKS fetcher all
//! write through here.
//!
//! Every change builds a new snapshot from the current one and publishes it atomically; a
//! call returns only once its snapshot is live, so any check that starts afterwards sees it
//! (read-your-writes), while checks in flight finish on the snapshot they pinned. Modules are
//! compiled and probed on the compiler thread, never on a request thread. A rejected module or
//! document leaves the old version serving.

use crate::compiler::Compiler;
use crate::config::{Config, ModuleSource, RegistryConfig};
use crate::metrics::{FetchLabels, Metrics};
use crate::snapshot::{LoadedPolicy, OciSource, Route, Snapshot, SnapshotStore};
use bytes::Bytes;
use sandgate_auth::{FetchError, Issuer, JwksFetcher, Key, KeyError, KeySets, KeyStore, Revocations, keys_from_jwks};
use sandgate_registry::{Credentials, ModuleRef, Pulled, Registry, RegistryError, RegistrySettings, TagFallback};
use sandgate_runtime::{LoadError, PolicyData, PolicyFault, PolicyModule, Runtime, sha256_hex};
use serde_json::Value;
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Why the sidecar could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The runtime could not start.
    #[error("cannot start the policy runtime")]
    Runtime(#[source] anyhow::Error),
    /// A file named by the configuration cannot be read.
    #[error("policy `{}`: cannot read `{}`", .0, .1.display())]
    Read(String, PathBuf, #[source] std::io::Error),
    /// A configured module does not load.
    #[error("policy `{0}` (`{1}`)")]
    Module(String, String, #[source] LoadError),
    /// A configured OCI tag resolved to a digest the allow-list does not have.
    #[error("policy `{0}`: `{1}` is not in the allowed_digests list")]
    DigestNotAllowed(String, String),
    /// A configured OCI module cannot be pulled.
    #[error("policy `{0}`")]
    Pull(String, #[source] RegistryError),
    /// The registry settings are unusable (a CA or credentials file).
    #[error("[registry]: {0}")]
    Registry(String, #[source] Box<dyn std::error::Error + Send + Sync>),
    /// A configured data document is not JSON.
    #[error("policy `{}`: data `{}` is not JSON", .0, .1.display())]
    Data(String, PathBuf, #[source] serde_json::Error),
    /// An issuer's keys or rules are invalid.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// The JWKS client could not be built.
    #[error(transparent)]
    Fetcher(#[from] FetchError),
    /// A listener could not be bound or configured.
    #[error("{0}")]
    Listen(String, #[source] std::io::Error),
    /// The admin API's settings are unusable.
    #[error("{0}")]
    Admin(String),
    /// The configuration contradicts itself.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The compiler thread could not start.
    #[error("cannot start the compiler thread")]
    Compiler(#[source] std::io::Error),
    /// The archive's writer thread could not start.
    #[error("[decision_log] archive_dir: cannot start the archive")]
    Archive(#[source] std::io::Error),
}

/// Why a change was refused. The old state keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The module does not load (not Wasm, not a component, wrong imports/exports, …).
    #[error("the module was rejected: {0}")]
    Module(#[from] LoadError),
    /// The module loads but fails its probe check.
    #[error("the module failed its probe check: {0}")]
    Probe(#[source] PolicyFault),
    /// The module's digest is not on the configured allow-list.
    #[error("module digest `{0}` is not in the allowed_digests list")]
    DigestNotAllowed(String),
    /// An `oci://` module could not be pulled.
    #[error("the module could not be pulled")]
    Pull(#[source] RegistryError),
    /// A policy id that is not 1 to 64 of `[A-Za-z0-9._-]`.
    #[error("`{0}` is not a policy id: use 1 to 64 of [A-Za-z0-9._-]")]
    BadId(String),
    /// A request body that is not what the call takes.
    #[error("{0}")]
    BadInput(String),
    /// A JWKS whose keys cannot be used.
    #[error("the JWKS is not usable: {0}")]
    Keys(#[source] KeyError),
    /// No such policy or issuer.
    #[error("{0}")]
    NotFound(String),
    /// The change would break the configuration (e.g. unloading a routed policy).
    #[error("{0}")]
    Conflict(String),
    /// A JWKS endpoint could not be fetched.
    #[error("the JWKS fetch failed")]
    Fetch(#[source] FetchError),
    /// The host failed, not the request (the compiler thread is gone).
    #[error("{0}")]
    Internal(&'static str),
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

/// The served state: the snapshot store and what it takes to change it.
pub struct State {
    /// The current snapshot.
    pub store: Arc<SnapshotStore>,
    /// The policy runtime.
    pub runtime: Arc<Runtime>,
    /// Every metric.
    pub metrics: Arc<Metrics>,
    /// JWKS fetching.
    pub fetcher: Arc<JwksFetcher>,
    /// Pulls `oci://` modules, through the module cache.
    pub registry: Arc<Registry>,
    /// Digests (hex, without `sha256:`) the admin API and policy directory may load: a module's
    /// own, or the manifest digest of the OCI artifact it came in; empty: any.
    allowed_digests: HashSet<String>,
    recent_modules: RecentModules,
    /// Serialises module uploads from compile to publish, so a quick upload (a cached
    /// rollback) cannot be overtaken by a slower one that started before it.
    pub(crate) module_writes: tokio::sync::Mutex<()>,
    /// Key ids blocked on this sidecar, by issuer: kept apart from the key sets, so that a
    /// fleet issuer that leaves the fleet's items and comes back is blocked as before.
    pub(crate) blocked_kids: std::sync::Mutex<HashMap<String, std::collections::BTreeSet<String>>>,
    compiler: Compiler,
    /// In a fleet: what this sidecar applied and how long it has been out of touch.
    pub fleet: Option<Arc<crate::fleet::FleetHealth>>,
    /// With `capture = "input"`: where every module and data document that served is kept.
    pub archive: Option<Arc<sandgate_records::Archive>>,
}

/// The snapshot store as the JWKS fetcher's [`KeyStore`], counting fetches.
struct FetchedKeys {
    store: Arc<SnapshotStore>,
    metrics: Arc<Metrics>,
}

impl KeyStore for FetchedKeys {
    fn key_sets(&self) -> Arc<KeySets> {
        self.store.load().keys.clone()
    }

    fn publish_fetched(&self, issuer: &str, keys: Vec<Key>) -> u64 {
        let published =
            self.store.update(|s| s.keys = Arc::new(s.keys.with_issuer(issuer, |i| i.with_fetched_keys(keys))));
        published.keys.version
    }

    fn fetch_finished(&self, issuer: &str, ok: bool) {
        let label = FetchLabels { issuer: issuer.to_owned(), result: if ok { "ok" } else { "error" } };
        self.metrics.jwks_fetches.get_or_create(&label).inc();
    }
}

impl State {
    /// Load policies and static keys from `config` (pulling `oci://` modules, compiling every
    /// module). JWKS endpoints are fetched later, when the sidecar starts. A configured OCI tag
    /// whose registry is unreachable is served by the digest it last resolved to, from the
    /// module cache.
    pub async fn from_config(config: &Config) -> Result<Arc<State>, StartError> {
        let runtime = Arc::new(Runtime::new(config.runtime.runtime_config()).map_err(StartError::Runtime)?);
        let registry = Arc::new(registry_from_config(&config.registry)?);
        let archive = match config.decision_log.capture {
            crate::config::Capture::Input => {
                let dir = config.decision_log.archive_dir.clone().unwrap_or_else(|| {
                    crate::config::cache_home().unwrap_or_else(|| PathBuf::from(".")).join("sandgate").join("archive")
                });
                Some(Arc::new(sandgate_records::Archive::start(dir).map_err(StartError::Archive)?))
            }
            _ => None,
        };
        let allowed_digests: HashSet<String> = config
            .admin
            .iter()
            .flat_map(|a| a.allowed_digests.iter())
            .map(|d| d.strip_prefix("sha256:").unwrap_or(d).to_ascii_lowercase())
            .collect();
        let mut policies = HashMap::new();
        for p in &config.policies {
            let (bytes, source) = match &p.module {
                ModuleSource::File(path) => {
                    let bytes = std::fs::read(path).map_err(|e| StartError::Read(p.id.clone(), path.clone(), e))?;
                    (bytes, None)
                }
                ModuleSource::Oci(reference) => {
                    let pulled = registry
                        .pull(reference, TagFallback::WhenUnreachable)
                        .await
                        .map_err(|e| StartError::Pull(p.id.clone(), e))?;
                    tracing::info!(policy = %p.id, reference = %reference, pinned = %pulled.pinned(), origin = ?pulled.origin, "pulled");
                    // A tag can move: with an allow-list, what it resolves to must be on it,
                    // at start as on a hot-load.
                    if !digest_allowed(&allowed_digests, &pulled.layer_digest, Some(&pulled.manifest_digest)) {
                        return Err(StartError::DigestNotAllowed(p.id.clone(), pulled.pinned().to_string()));
                    }
                    let source = oci_source(&pulled);
                    (pulled.module.to_vec(), Some(source))
                }
            };
            let module = runtime.load(&bytes).map_err(|e| StartError::Module(p.id.clone(), p.module.to_string(), e))?;
            if let Some(archive) = &archive {
                archive.keep(&format!("sha256:{}", module.digest()), || bytes.clone());
            }
            let value = match &p.data {
                Some(path) => {
                    let bytes = std::fs::read(path).map_err(|e| StartError::Read(p.id.clone(), path.clone(), e))?;
                    serde_json::from_slice(&bytes).map_err(|e| StartError::Data(p.id.clone(), path.clone(), e))?
                }
                None => Value::Null,
            };
            let loaded = LoadedPolicy {
                id: p.id.clone(),
                module,
                data: Arc::new(PolicyData::new(value, 1)),
                loaded_at: SystemTime::now(),
                shadow: None,
                source,
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
        let routes: Arc<[Route]> = routes.into();
        let fleet =
            config.fleet.as_ref().map(|f| Arc::new(crate::fleet::FleetHealth::new(f, routes.clone(), issuers.clone())));
        let snapshot = Snapshot {
            version: 1,
            policies,
            routes,
            default_policy: config.server.default_policy.clone(),
            keys: Arc::new(KeySets { version: 1, issuers }),
            revocations: Arc::new(Revocations {
                version: 1,
                jtis: config.revocations.jtis.iter().cloned().collect(),
                subjects: config.revocations.subjects.iter().cloned().collect(),
            }),
            fleet_revision: config.fleet.as_ref().map(|_| 0),
        };
        let store = Arc::new(SnapshotStore::new(snapshot));
        let metrics = Arc::new(Metrics::default());
        let keys = Arc::new(FetchedKeys { store: store.clone(), metrics: metrics.clone() });
        let fetcher = Arc::new(JwksFetcher::new(&config.issuers, keys)?);
        Ok(Arc::new(State {
            store,
            runtime,
            metrics,
            fetcher,
            registry,
            allowed_digests,
            recent_modules: RecentModules::default(),
            module_writes: tokio::sync::Mutex::new(()),
            blocked_kids: std::sync::Mutex::new(HashMap::new()),
            compiler: Compiler::start().map_err(StartError::Compiler)?,
            fleet,
            archive,
        }))
    }

    /// Compile, validate and probe `bytes` on the compiler thread, unless a module with the
    /// same digest was compiled recently (a rollback is then instant). On an allow-list, the
    /// module's own digest or `manifest` (the digest of the OCI artifact it came in) must be.
    pub(crate) async fn compile(&self, bytes: Bytes, manifest: Option<&str>) -> Result<PolicyModule, ChangeError> {
        let digest = sha256_hex(&bytes);
        if !digest_allowed(&self.allowed_digests, &digest, manifest) {
            return Err(ChangeError::DigestNotAllowed(manifest.map_or_else(|| digest.clone(), str::to_owned)));
        }
        if let Some(module) = self.recent_modules.get(&digest) {
            return Ok(module);
        }
        let runtime = self.runtime.clone();
        let kept = bytes.clone();
        let (done, result) = tokio::sync::oneshot::channel();
        let queued = self.compiler.run(move || {
            let compiled = runtime.load(&bytes).map_err(ChangeError::from).and_then(|module| {
                runtime.probe(&module, crate::decide::unix_now()).map_err(ChangeError::Probe)?;
                Ok(module)
            });
            let _ = done.send(compiled);
        });
        if !queued {
            return Err(ChangeError::Internal("the compiler thread is gone"));
        }
        let module = result.await.map_err(|_| ChangeError::Internal("compilation did not finish"))??;
        if let Some(archive) = &self.archive {
            archive.keep(&format!("sha256:{digest}"), || kept.to_vec());
        }
        self.recent_modules.insert(digest, module.clone());
        Ok(module)
    }

    /// Load or replace policy `id`; its data document is kept. Returns the live snapshot.
    pub async fn put_policy(&self, id: &str, bytes: Bytes) -> Result<Arc<Snapshot>, ChangeError> {
        check_id(id)?;
        let _writes = self.module_writes.lock().await;
        let module = self.compile(bytes, None).await?;
        Ok(self.publish_policy(id, module, None))
    }

    /// Load or replace policy `id` with the OCI artifact `reference`: a tag is resolved now, at
    /// the registry (never from the cache, unless the sidecar is offline: the operator asks
    /// for the tag as it is), and pinned.
    /// Nothing changes unless the whole module is pulled, verified, compiled and probed.
    pub async fn put_policy_from(&self, id: &str, reference: &ModuleRef) -> Result<Arc<Snapshot>, ChangeError> {
        check_id(id)?;
        let _writes = self.module_writes.lock().await;
        let pulled = self.pull(reference).await?;
        let module = self.compile(pulled.module.clone(), Some(&pulled.manifest_digest)).await?;
        Ok(self.publish_policy(id, module, Some(oci_source(&pulled))))
    }

    async fn pull(&self, reference: &ModuleRef) -> Result<Pulled, ChangeError> {
        let pulled = self.registry.pull(reference, TagFallback::Never).await.map_err(ChangeError::Pull)?;
        tracing::info!(reference = %reference, pinned = %pulled.pinned(), origin = ?pulled.origin, "pulled");
        Ok(pulled)
    }

    fn publish_policy(&self, id: &str, module: PolicyModule, source: Option<Arc<OciSource>>) -> Arc<Snapshot> {
        self.store.update(|s| {
            let (data, shadow) = match s.policies.get(id) {
                Some(old) => (old.data.clone(), old.shadow.clone()),
                None => (Arc::new(PolicyData::default()), None),
            };
            let loaded = LoadedPolicy { id: id.to_owned(), module, data, loaded_at: SystemTime::now(), shadow, source };
            s.policies.insert(id.to_owned(), Arc::new(loaded));
        })
    }

    /// Replace policy `id`'s data document.
    pub fn put_data(&self, id: &str, value: Value) -> Result<Arc<Snapshot>, ChangeError> {
        self.change_policy(id, |old| LoadedPolicy {
            data: Arc::new(PolicyData::new(value, old.data.version + 1)),
            ..old.clone()
        })
    }

    /// Attach (`Some`) or detach (`None`) a shadow candidate to policy `id`.
    pub async fn set_shadow(&self, id: &str, bytes: Option<Bytes>) -> Result<Arc<Snapshot>, ChangeError> {
        let _writes = self.module_writes.lock().await;
        let candidate = match bytes {
            Some(bytes) => Some(self.compile(bytes, None).await?),
            None => None,
        };
        self.change_policy(id, |old| LoadedPolicy { shadow: candidate, ..old.clone() })
    }

    /// Attach the OCI artifact `reference` as policy `id`'s shadow candidate.
    pub async fn set_shadow_from(&self, id: &str, reference: &ModuleRef) -> Result<Arc<Snapshot>, ChangeError> {
        let _writes = self.module_writes.lock().await;
        let pulled = self.pull(reference).await?;
        let candidate = Some(self.compile(pulled.module.clone(), Some(&pulled.manifest_digest)).await?);
        self.change_policy(id, |old| LoadedPolicy { shadow: candidate, ..old.clone() })
    }

    fn change_policy(
        &self,
        id: &str,
        change: impl FnOnce(&LoadedPolicy) -> LoadedPolicy,
    ) -> Result<Arc<Snapshot>, ChangeError> {
        self.store.try_update(|s| {
            let old = s.policies.get(id).ok_or_else(|| ChangeError::NotFound(format!("no policy `{id}`")))?;
            let new = change(old);
            s.policies.insert(id.to_owned(), Arc::new(new));
            Ok(())
        })
    }

    /// Unload policy `id`. Unless `even_if_routed`, refuse while a route or the default
    /// policy uses it; if it is unloaded anyway, those routes answer 403 `no_route`.
    pub fn remove_policy(&self, id: &str, even_if_routed: bool) -> Result<Arc<Snapshot>, ChangeError> {
        self.store.try_update(|s| {
            if !s.policies.contains_key(id) {
                return Err(ChangeError::NotFound(format!("no policy `{id}`")));
            }
            if !even_if_routed && (s.routes.iter().any(|r| r.policy == id) || s.default_policy.as_deref() == Some(id)) {
                return Err(ChangeError::Conflict(format!(
                    "policy `{id}` is used by a route; change the routes first"
                )));
            }
            s.policies.remove(id);
            Ok(())
        })
    }

    /// Add (`revoke`) or remove revocations.
    pub fn change_revocations(&self, change: &RevocationChange, revoke: bool) -> Arc<Snapshot> {
        self.store.update(|s| {
            let mut next = Revocations::clone(&s.revocations);
            next.version += 1;
            for jti in &change.jtis {
                if revoke {
                    next.jtis.insert(jti.clone())
                } else {
                    next.jtis.remove(jti)
                };
            }
            for subject in &change.subjects {
                if revoke {
                    next.subjects.insert(subject.clone())
                } else {
                    next.subjects.remove(subject)
                };
            }
            s.revocations = Arc::new(next);
        })
    }

    /// Replace `issuer`'s static keys (keys from its JWKS endpoint stay).
    pub fn rotate_keys(&self, issuer: &str, jwks: &jsonwebtoken::jwk::JwkSet) -> Result<Arc<Snapshot>, ChangeError> {
        let keys: Vec<Key> = keys_from_jwks(jwks, false).map_err(ChangeError::Keys)?;
        if keys.is_empty() {
            return Err(ChangeError::BadInput(
                "the JWKS has no keys; an issuer without keys would reject every token".into(),
            ));
        }
        self.store.try_update(|s| {
            if !s.keys.issuers.contains_key(issuer) {
                return Err(ChangeError::NotFound(format!("no issuer `{issuer}`")));
            }
            s.keys = Arc::new(s.keys.with_issuer(issuer, |current| current.with_static_keys(keys)));
            Ok(())
        })
    }

    /// Block (`true`) or unblock `kid` of `issuer`: tokens naming a blocked key are refused
    /// (`kid_blocked`) from the next check on, whatever the key sets hold.
    pub fn block_kid(&self, issuer: &str, kid: &str, blocked: bool) -> Result<Arc<Snapshot>, ChangeError> {
        self.store.try_update(|s| {
            if !s.keys.issuers.contains_key(issuer) {
                return Err(ChangeError::NotFound(format!("no issuer `{issuer}`")));
            }
            s.keys = Arc::new(s.keys.with_issuer(issuer, |current| current.with_blocked_kid(kid, blocked)));
            let mut registry = self.blocked_kids.lock().unwrap_or_else(|e| e.into_inner());
            let kids = registry.entry(issuer.to_owned()).or_default();
            if blocked {
                kids.insert(kid.to_owned());
            } else {
                kids.remove(kid);
            }
            Ok(())
        })
    }

    /// Fetch `issuer`'s JWKS now; returns the live snapshot.
    pub async fn refresh_jwks(&self, issuer: &str) -> Result<Arc<Snapshot>, ChangeError> {
        match self.fetcher.fetch(issuer).await {
            Ok(()) => Ok(self.store.load()),
            Err(FetchError::NoEndpoint(_)) => {
                Err(ChangeError::NotFound(format!("issuer `{issuer}` has no JWKS endpoint")))
            }
            Err(e) => Err(ChangeError::Fetch(e)),
        }
    }
}

/// The most recently compiled modules by digest, so re-uploading a known module (a rollback,
/// a deploy tool re-sending everything) skips compilation.
#[derive(Default)]
struct RecentModules(Mutex<VecDeque<(String, PolicyModule)>>);

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

/// Whether a module (its own digest, and the manifest digest of the artifact it came in) is on
/// the allow-list (hex digests, no `sha256:`); an empty list allows everything.
fn digest_allowed(allowed: &HashSet<String>, module: &str, manifest: Option<&str>) -> bool {
    let hex = |d: &str| d.strip_prefix("sha256:").unwrap_or(d).to_owned();
    allowed.is_empty() || allowed.contains(&hex(module)) || manifest.is_some_and(|m| allowed.contains(&hex(m)))
}

pub(crate) fn oci_source(pulled: &Pulled) -> Arc<OciSource> {
    Arc::new(OciSource { requested: pulled.reference.to_string(), pinned: pulled.pinned().to_string() })
}

/// The registry client `config` describes (CA and credential files read now).
pub fn registry_from_config(config: &RegistryConfig) -> Result<Registry, StartError> {
    Registry::new(registry_settings(config)?)
        .map_err(|e| StartError::Registry("the registry client cannot be built".into(), Box::new(e)))
}

/// The registry settings `config` describes (CA and credential files read now).
pub fn registry_settings(config: &RegistryConfig) -> Result<RegistrySettings, StartError> {
    let read = |path: &PathBuf, what: &str| {
        std::fs::read(path)
            .map_err(|e| StartError::Registry(format!("cannot read the {what} `{}`", path.display()), Box::new(e)))
    };
    let first_line = |path: &PathBuf, what: &str| -> Result<String, StartError> {
        let text = read(path, what)?;
        Ok(String::from_utf8_lossy(&text).lines().next().unwrap_or_default().trim().to_owned())
    };
    let mut credentials = HashMap::new();
    for c in &config.credentials {
        let secret = |inline: &Option<String>, file: &Option<PathBuf>, what| match (inline, file) {
            (Some(value), _) => Ok(Some(value.clone())),
            (None, Some(path)) => first_line(path, what).map(Some),
            (None, None) => Ok(None),
        };
        let entry = match (&c.username, secret(&c.password, &c.password_file, "password file")?) {
            (Some(username), Some(password)) => Credentials::Basic { username: username.clone(), password },
            _ => match secret(&c.token, &c.token_file, "token file")? {
                Some(token) => Credentials::Bearer(token),
                None => {
                    return Err(StartError::Config(crate::ConfigError::Invalid(format!(
                        "[[registry.credentials]] `{}` has no usable credentials",
                        c.registry
                    ))));
                }
            },
        };
        credentials.insert(c.registry.clone(), entry);
    }
    let cache_dir =
        config.cache_dir.clone().or_else(|| crate::config::cache_home().map(|base| base.join("sandgate").join("oci")));
    let settings = RegistrySettings {
        cache_dir,
        offline: config.offline,
        max_module_bytes: config.max_module_mib << 20,
        plain_http: config.plain_http.clone(),
        loopback_plain_http: config.loopback_plain_http,
        tls: config.tls.clone(),
        ca_pem: match &config.ca_file {
            Some(path) => vec![read(path, "CA file")?],
            None => Vec::new(),
        },
        credentials,
        timeout: std::time::Duration::from_secs(config.timeout_secs),
        pull_deadline: std::time::Duration::from_secs(config.pull_deadline_secs),
        allowed_registries: config.allowed_registries.iter().map(|r| r.to_ascii_lowercase()).collect(),
        cosign_keys: config
            .cosign_public_keys
            .iter()
            .map(|path| read(path, "cosign public key"))
            .collect::<Result<_, _>>()?,
    };
    for host in &settings.plain_http {
        if !sandgate_registry::is_loopback_host(host) {
            tracing::warn!(registry = %host, "modules are pulled from this registry over plain HTTP");
        }
    }
    Ok(settings)
}

fn check_id(id: &str) -> Result<(), ChangeError> {
    let ok = !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok { Ok(()) } else { Err(ChangeError::BadId(id.to_owned())) }
}
