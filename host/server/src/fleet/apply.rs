//! Applying the fleet's desired state: one new snapshot that is exactly the bucket at one
//! revision, built from the current one. Modules are pulled and compiled first (off the
//! request path, on the compiler thread); an item that cannot be applied keeps its previous
//! version and is reported.

use super::desired::{DesiredState, FLEET_OBJECT, IssuerItem, Key, PolicyItem, RevocationItem, RouteItem};
use crate::config::MAX_LEEWAY_SECS;
use crate::snapshot::{LoadedPolicy, OciSource, Route};
use crate::state::State;
use sandgate_auth::{Issuer, IssuerConfig, KeySets, Revocations};
use sandgate_registry::{ModuleRef, TagFallback};
use sandgate_runtime::{PolicyData, PolicyModule};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A module as the fleet names it, resolved: what a `policy.<id>` or `shadow.<id>` item runs.
pub(crate) type Resolved = (PolicyModule, Option<Arc<OciSource>>);

/// Static keys, shared between key sets.
type SharedKeys = Vec<Arc<sandgate_auth::Key>>;

/// An item of the desired state that could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ItemError {
    /// Its key.
    pub key: String,
    /// The revision it was written at.
    pub revision: u64,
    /// Why it was not applied.
    pub error: String,
}

/// The issuers and static keys the fleet's items describe, parsed.
struct FleetKeys {
    /// Issuers from `issuer.<iss>` items.
    issuers: Vec<Issuer>,
    /// Static keys from `keys.<iss>` items, by issuer.
    keys: HashMap<String, SharedKeys>,
}

/// When a desired state is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// At start, from the cached state, before anything is served and before NATS is
    /// reached: a tag whose registry cannot be reached falls back to the digest it last
    /// resolved to, and an item that fails is tried again on the next apply.
    Start,
    /// From the watch: a tag is resolved at its registry or the item fails (the version
    /// serving now stays). An item that failed is not pulled again by later applies (a
    /// revocation must not wait out a registry's timeouts); its module is tried again in the
    /// background, with back-off, until it resolves or the item is written again.
    Live,
}

impl State {
    /// Publish the snapshot `desired` describes, with `fleet_revision = desired.revision`;
    /// revocations whose `until` is not after `now` are left out. Returns the items that could
    /// not be applied (each keeps its previous version).
    pub async fn apply_desired(&self, desired: &DesiredState, now: u64, phase: Phase) -> Vec<ItemError> {
        let Some(fleet) = self.fleet.clone() else { return Vec::new() };
        let reparse_data = fleet.reparse_data.swap(false, std::sync::atomic::Ordering::AcqRel);
        let _writes = self.module_writes.lock().await;
        let current = self.store.load();
        let mut errors = Vec::new();
        let mut modules: HashMap<String, Resolved> = HashMap::new();
        let mut shadows: HashMap<String, PolicyModule> = HashMap::new();
        let mut data: HashMap<String, Arc<PolicyData>> = HashMap::new();
        let mut routes: Vec<(String, RouteItem)> = Vec::new();
        let mut key_items: BTreeMap<&str, (Key, &str, u64)> = BTreeMap::new();
        let mut jtis = HashSet::new();
        let mut subjects = HashSet::new();
        let mut referenced = HashSet::new();
        for (key, (value, revision)) in &desired.items {
            let fail = |error: String| ItemError { key: key.clone(), revision: *revision, error };
            match Key::parse(key) {
                Some(Key::Policy(id)) => match self.fleet_module(key, *revision, value, &mut referenced, phase).await {
                    Ok(module) => {
                        modules.insert(id, module);
                    }
                    Err(error) => {
                        // Keep what serves now, if anything.
                        if let Some(old) = current.policies.get(&id) {
                            modules.insert(id, (old.module.clone(), old.source.clone()));
                        }
                        errors.push(fail(error));
                    }
                },
                Some(Key::Shadow(id)) => match self.fleet_module(key, *revision, value, &mut referenced, phase).await {
                    Ok((module, _)) => {
                        shadows.insert(id, module);
                    }
                    Err(error) => {
                        if let Some(old) = current.policies.get(&id).and_then(|p| p.shadow.clone()) {
                            shadows.insert(id, old);
                        }
                        errors.push(fail(error));
                    }
                },
                Some(Key::Data(id)) => {
                    let old = current.policies.get(&id).map(|p| p.data.clone());
                    match old {
                        Some(old) if old.version == *revision && !reparse_data => {
                            data.insert(id, old);
                        }
                        _ => match serde_json::from_str(value) {
                            Ok(value) => {
                                data.insert(id, Arc::new(PolicyData::new(value, *revision)));
                            }
                            Err(e) => {
                                if let Some(old) = old {
                                    data.insert(id, old);
                                }
                                errors.push(fail(format!("the data document is not JSON: {e}")));
                            }
                        },
                    }
                }
                Some(Key::Route(name)) => match route_item(&name, value) {
                    Ok(route) => routes.push((name, route)),
                    Err(error) => errors.push(fail(error)),
                },
                Some(k @ (Key::Issuer(_) | Key::Keys(_))) => {
                    key_items.insert(key, (k, value, *revision));
                }
                Some(Key::RevokedJti(jti)) => match in_force(value, now) {
                    Ok(true) => {
                        jtis.insert(jti);
                    }
                    Ok(false) => {}
                    Err(error) => {
                        // Fail closed: a revocation that cannot be read still revokes.
                        jtis.insert(jti);
                        errors.push(fail(error));
                    }
                },
                Some(Key::RevokedSubject(subject)) => match in_force(value, now) {
                    Ok(true) => {
                        subjects.insert(subject);
                    }
                    Ok(false) => {}
                    Err(error) => {
                        subjects.insert(subject);
                        errors.push(fail(error));
                    }
                },
                Some(Key::Unreadable(_)) => {
                    errors.push(fail("the id in this key is not base64url: the item was not applied".into()));
                }
                None => {}
            }
        }
        fleet.keep_resolved(&referenced);
        for (id, _) in shadows.iter().filter(|(id, _)| !modules.contains_key(*id)) {
            let revision = desired.items.get(&format!("shadow.{id}")).map_or(0, |(_, r)| *r);
            errors.push(ItemError {
                key: format!("shadow.{id}"),
                revision,
                error: format!("the fleet has no policy `{id}` to shadow"),
            });
        }
        order_routes(&mut routes);
        let fleet_keys = self.fleet_keys(&fleet, &key_items, &mut errors);
        self.store.update(|s| {
            let mut policies = HashMap::new();
            for (id, (module, source)) in modules {
                let old = s.policies.get(&id);
                let data = data
                    .get(&id)
                    .cloned()
                    .or_else(|| old.filter(|o| o.data.version == 0).map(|o| o.data.clone()))
                    .unwrap_or_else(|| Arc::new(PolicyData::default()));
                let shadow = shadows.remove(&id);
                let unchanged = old.is_some_and(|o| {
                    o.module.digest() == module.digest()
                        && o.source == source
                        && Arc::ptr_eq(&o.data, &data)
                        && o.shadow.as_ref().map(PolicyModule::digest) == shadow.as_ref().map(PolicyModule::digest)
                });
                let loaded = match old {
                    Some(old) if unchanged => old.clone(),
                    _ => Arc::new(LoadedPolicy {
                        id: id.clone(),
                        module,
                        data,
                        loaded_at: SystemTime::now(),
                        shadow,
                        source,
                    }),
                };
                policies.insert(id, loaded);
            }
            s.policies = policies;
            s.routes = routes
                .into_iter()
                .map(|(_, r)| Route {
                    host: r.host.map(|h| h.to_ascii_lowercase()),
                    path_prefix: r.path_prefix,
                    policy: r.policy,
                })
                .chain(fleet.local_routes.iter().cloned())
                .collect();
            if let Some(fleet_keys) = fleet_keys {
                let blocked = self.blocked_kids.lock().unwrap_or_else(|e| e.into_inner());
                s.keys = Arc::new(key_sets(&s.keys, &fleet.local_issuers, fleet_keys, &blocked));
            }
            if s.revocations.jtis != jtis || s.revocations.subjects != subjects {
                s.revocations = Arc::new(Revocations { version: s.revocations.version + 1, jtis, subjects });
            }
            s.fleet_revision = Some(desired.revision);
        });
        errors
    }

    /// The issuers and keys the fleet's `issuer.*` and `keys.*` items describe; `None` when
    /// they are the ones last applied (the key sets are left as they are, with their JWKS
    /// fetches). Their errors are added to `errors` either way.
    fn fleet_keys(
        &self,
        fleet: &super::FleetHealth,
        items: &BTreeMap<&str, (Key, &str, u64)>,
        errors: &mut Vec<ItemError>,
    ) -> Option<FleetKeys> {
        let fingerprint: Vec<(String, u64)> = items.iter().map(|(k, (_, _, r))| ((*k).to_owned(), *r)).collect();
        let mut last = fleet.keys_applied.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_ref().is_some_and(|(f, _)| *f == fingerprint) {
            errors.extend(last.as_ref().map(|(_, e)| e.clone()).unwrap_or_default());
            return None;
        }
        let mut own_errors = Vec::new();
        let mut parsed = FleetKeys { issuers: Vec::new(), keys: HashMap::new() };
        let fleet_issuers: HashSet<&str> = items
            .values()
            .filter_map(|(k, _, _)| if let Key::Issuer(iss) = k { Some(iss.as_str()) } else { None })
            .collect();
        for (key, (item, value, revision)) in items {
            let fail = |error: String| ItemError { key: (*key).to_owned(), revision: *revision, error };
            match item {
                Key::Issuer(iss) => match fleet_issuer(iss, value, &fleet.local_issuers) {
                    Ok(issuer) => parsed.issuers.push(issuer),
                    Err(error) => own_errors.push(fail(error)),
                },
                Key::Keys(iss) => {
                    if !fleet.local_issuers.contains_key(iss) && !fleet_issuers.contains(iss.as_str()) {
                        own_errors
                            .push(fail(format!("no issuer `{iss}` in this sidecar's configuration or the fleet")));
                        continue;
                    }
                    match static_keys(value) {
                        Ok(keys) => {
                            parsed.keys.insert(iss.clone(), keys);
                        }
                        Err(error) => own_errors.push(fail(error)),
                    }
                }
                _ => {}
            }
        }
        errors.extend(own_errors.iter().cloned());
        *last = Some((fingerprint, own_errors));
        Some(parsed)
    }

    /// The module `value` (a `policy.<id>` or `shadow.<id>` item) names: the one already
    /// resolved for the same reference, else pulled (or read from the fleet's object store),
    /// verified, compiled and probed.
    async fn fleet_module(
        &self,
        key: &str,
        revision: u64,
        value: &str,
        referenced: &mut HashSet<String>,
        phase: Phase,
    ) -> Result<Resolved, String> {
        let Some(fleet) = &self.fleet else { return Err("not in a fleet".into()) };
        let item: PolicyItem = serde_json::from_str(value)
            .map_err(|e| format!("expected {{\"module\": \"oci://…\"}} or {{\"module\": \"fleet:sha256:…\"}}: {e}"))?;
        referenced.insert(item.module.clone());
        if let Some(resolved) = fleet.resolved(&item.module) {
            return Ok(resolved);
        }
        // An item that failed is not pulled again for every later batch (a revocation must not
        // wait out a registry's timeouts each time): it is tried again when it is written again,
        // and its module in the background (`retry_modules`).
        if let Some(error) = fleet.failed_item(key, revision) {
            return Err(error);
        }
        let result = match item.module.strip_prefix(FLEET_OBJECT) {
            Some(digest) => self.fleet_object(fleet, digest).await,
            None => self.pull_and_compile(&item.module, phase).await,
        };
        match &result {
            Ok(resolved) => fleet.remember_resolved(&item.module, resolved.clone()),
            Err(error) if phase == Phase::Live => fleet.remember_failure(key, revision, error),
            Err(_) => {}
        }
        result
    }

    /// Try again the modules of `items` (the `(key, value)` of `policy.*` and `shadow.*` items
    /// whose module failed: a registry or the object store out of reach, a module not yet
    /// pushed). Each one that resolves now is remembered for the next apply, which takes it
    /// without pulling. Nothing is applied here: returns how many resolved.
    pub(crate) async fn retry_modules(&self, items: &[(String, String)]) -> usize {
        let Some(fleet) = self.fleet.clone() else { return 0 };
        let mut resolved = 0;
        for (key, value) in items {
            let Ok(item) = serde_json::from_str::<PolicyItem>(value) else { continue };
            if fleet.resolved(&item.module).is_some() {
                continue;
            }
            let result = match item.module.strip_prefix(FLEET_OBJECT) {
                Some(digest) => self.fleet_object(&fleet, digest).await,
                None => self.pull_and_compile(&item.module, Phase::Live).await,
            };
            match result {
                Ok(module) => {
                    tracing::info!(key = %key, module = %item.module, "a fleet module that had failed resolved on a retry");
                    fleet.remember_resolved(&item.module, module);
                    resolved += 1;
                }
                Err(error) => tracing::debug!(key = %key, error = %error, "a fleet module still fails"),
            }
        }
        resolved
    }

    async fn pull_and_compile(&self, module: &str, phase: Phase) -> Result<Resolved, String> {
        let reference: ModuleRef = module.parse().map_err(|e: sandgate_registry::BadReference| e.to_string())?;
        // Only at start may a tag stand for the digest it last resolved to: a tag written to
        // the bucket while its registry is down must not load whatever that tag once was.
        let fallback = match phase {
            Phase::Start => TagFallback::WhenUnreachable,
            Phase::Live => TagFallback::Never,
        };
        let pulled = self.registry.pull(&reference, fallback).await.map_err(|e| sandgate_auth::error_chain(&e))?;
        let module = self
            .compile(pulled.module.clone(), Some(&pulled.manifest_digest))
            .await
            .map_err(|e| sandgate_auth::error_chain(&e))?;
        Ok((module, Some(crate::state::oci_source(&pulled))))
    }

    /// Module `digest` (`sha256:<hex>`) of the fleet's object store: from the module cache, or
    /// fetched from NATS, its size bounded and its digest checked before anything else.
    async fn fleet_object(&self, fleet: &super::FleetHealth, digest: &str) -> Result<Resolved, String> {
        if !sandgate_registry::valid_digest(digest) {
            return Err(format!("expected fleet:sha256:<64 hex digits>, not `{FLEET_OBJECT}{digest}`"));
        }
        let settings = self.registry.settings();
        if !settings.cosign_keys.is_empty() {
            return Err("this sidecar requires cosign signatures ([registry] cosign_public_keys) and a module \
                        from the fleet's object store carries none: publish it to an OCI registry and sign it"
                .into());
        }
        let limit = settings.max_module_bytes;
        let cached = self.registry.cache().and_then(|c| c.read_blob(digest, limit).ok().flatten());
        let bytes = match cached {
            Some(bytes) => bytes,
            None => {
                let client = fleet.client.get().ok_or("not in the module cache, and NATS is not reachable yet")?;
                let fetch = super::fetch_object(client, &fleet.name, digest, limit);
                let bytes = tokio::time::timeout(Duration::from_secs(60), fetch)
                    .await
                    .map_err(|_| format!("fetching {digest} from the fleet's object store took over 60 s"))??;
                if let Some(cache) = self.registry.cache()
                    && let Err(e) = cache.write_blob(&bytes)
                {
                    tracing::warn!(%digest, error = %e, "cannot cache a module from the fleet's object store");
                }
                bytes
            }
        };
        let module = self.compile(bytes.into(), None).await.map_err(|e| sandgate_auth::error_chain(&e))?;
        let name = format!("{FLEET_OBJECT}{digest}");
        Ok((module, Some(Arc::new(OciSource { requested: name.clone(), pinned: name }))))
    }
}

/// Fleet routes, most specific first: a host before none, a longer prefix before a shorter,
/// then by name. The order never depends on which writer came last.
fn order_routes(routes: &mut [(String, RouteItem)]) {
    routes.sort_by(|(a_name, a), (b_name, b)| {
        (b.host.is_some(), b.path_prefix.trim_end_matches('/').len(), a_name).cmp(&(
            a.host.is_some(),
            a.path_prefix.trim_end_matches('/').len(),
            b_name,
        ))
    });
}

/// A `route.<name>` item, checked.
fn route_item(name: &str, value: &str) -> Result<RouteItem, String> {
    let route: RouteItem = serde_json::from_str(value)
        .map_err(|e| format!("expected {{\"host\": \"…\", \"path_prefix\": \"/…\", \"policy\": \"<id>\"}}: {e}"))?;
    if !crate::config::valid_fleet_name(name) {
        return Err(format!("route name `{name}` must be 1 to 64 of [A-Za-z0-9_-]"));
    }
    if !route.path_prefix.starts_with('/') {
        return Err(format!("path_prefix `{}` must start with `/`", route.path_prefix));
    }
    if route.host.as_deref().is_some_and(|h| h.is_empty() || h.contains(['/', ' '])) {
        return Err("host must be a host name without port or path".into());
    }
    Ok(route)
}

/// An `issuer.<iss>` item as an issuer with its static keys.
fn fleet_issuer(iss: &str, value: &str, local: &HashMap<String, Arc<Issuer>>) -> Result<Issuer, String> {
    if local.contains_key(iss) {
        return Err(format!(
            "issuer `{iss}` is in this sidecar's configuration, which wins: use `keys` to rotate its keys"
        ));
    }
    let item: IssuerItem = serde_json::from_str(value).map_err(|e| {
        format!("expected {{\"audiences\": [..], \"algorithms\": [..], \"jwks\": {{\"keys\": [..]}}}}: {e}")
    })?;
    if item.audiences.is_empty() {
        return Err("an issuer needs at least one audience".into());
    }
    check_issuer_item(&item)?;
    let config = IssuerConfig {
        issuer: iss.to_owned(),
        audiences: item.audiences,
        algorithms: item.algorithms,
        leeway_secs: item.leeway_secs,
        keys: Vec::new(),
        jwks_url: None,
        discovery_url: None,
        jwks_refresh_secs: 300,
        jwks_max_stale_secs: None,
        jwks_min_refetch_ms: 10_000,
    };
    let issuer = Issuer::from_config(&config).map_err(|e| sandgate_auth::error_chain(&e))?;
    let keys = static_keys(&serde_json::to_string(&item.jwks).map_err(|e| e.to_string())?)?;
    Ok(issuer.with_shared_static_keys(keys))
}

/// What a configured issuer is held to (`Config::check`) and serde cannot say: a bounded
/// clock leeway and at least one algorithm. Without it a fleet item's leeway of years would
/// keep expired tokens valid, and one past the current time would overflow the expiry check.
/// `sandgate fleet issuer` checks it before writing.
pub fn check_issuer_item(item: &IssuerItem) -> Result<(), String> {
    if item.leeway_secs > MAX_LEEWAY_SECS {
        return Err(format!(
            "leeway_secs {} is more than {MAX_LEEWAY_SECS}: an expired token would stay valid that long",
            item.leeway_secs
        ));
    }
    if item.algorithms.is_empty() {
        return Err("an issuer needs at least one algorithm".into());
    }
    Ok(())
}

/// The public keys of a JWKS item; shared secrets are refused.
fn static_keys(value: &str) -> Result<SharedKeys, String> {
    let set: jsonwebtoken::jwk::JwkSet =
        serde_json::from_str(value).map_err(|e| format!("expected a JWKS {{\"keys\": [..]}}: {e}"))?;
    if set.keys.iter().any(|k| matches!(k.algorithm, jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_))) {
        return Err("a shared secret (`oct`) is not taken from the fleet: every reader of the bucket could sign \
                    tokens with it; configure it in the sidecar's [[issuers]]"
            .into());
    }
    let keys = sandgate_auth::keys_from_jwks(&set, false).map_err(|e| sandgate_auth::error_chain(&e))?;
    if keys.is_empty() {
        return Err("the JWKS has no keys; an issuer without keys would reject every token".into());
    }
    Ok(keys.into_iter().map(Arc::new).collect())
}

/// The key sets after `current`: the configured issuers (their JWKS-endpoint keys as fetched
/// so far, their static keys from a `keys.<iss>` item if there is one), then the fleet's.
/// `blocked` is every key id blocked on this sidecar, by issuer.
fn key_sets(
    current: &KeySets,
    local: &HashMap<String, Arc<Issuer>>,
    mut fleet: FleetKeys,
    blocked: &HashMap<String, BTreeSet<String>>,
) -> KeySets {
    let mut issuers = HashMap::new();
    for (iss, configured) in local {
        let live = current.issuers.get(iss).unwrap_or(configured);
        let keys = fleet.keys.remove(iss).unwrap_or_else(|| configured.static_keys());
        issuers.insert(iss.clone(), Arc::new(live.with_shared_static_keys(keys)));
    }
    for issuer in fleet.issuers {
        let mut issuer = match fleet.keys.remove(&issuer.issuer) {
            Some(keys) => issuer.with_shared_static_keys(keys),
            None => issuer,
        };
        // A key blocked on this sidecar stays blocked, even if its issuer left the fleet's
        // items meanwhile (a removal, or one malformed write) and came back.
        if let Some(kids) = blocked.get(&issuer.issuer) {
            issuer.blocked_kids = kids.clone();
        }
        issuers.insert(issuer.issuer.clone(), Arc::new(issuer));
    }
    KeySets { version: current.version + 1, issuers }
}

/// Whether a revocation item is in force at `now`.
fn in_force(value: &str, now: u64) -> Result<bool, String> {
    let item: RevocationItem =
        serde_json::from_str(value).map_err(|e| format!("expected {{\"until\": UNIX_SECONDS}} or {{}}: {e}"))?;
    Ok(item.until.is_none_or(|until| until > now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_routes_go_most_specific_first_whatever_the_order_written() {
        let route = |host: Option<&str>, prefix: &str| RouteItem {
            host: host.map(str::to_owned),
            path_prefix: prefix.into(),
            policy: "p".into(),
        };
        let mut routes = vec![
            ("a".to_owned(), route(None, "/")),
            ("b".to_owned(), route(None, "/api/")),
            ("c".to_owned(), route(Some("admin.example"), "/")),
            ("d".to_owned(), route(None, "/api/v2")),
            ("e".to_owned(), route(None, "/api")),
        ];
        order_routes(&mut routes);
        let names: Vec<&str> = routes.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["c", "d", "b", "e", "a"]);
    }

    #[test]
    fn bad_route_issuer_and_key_items_are_refused_with_a_reason() {
        assert!(
            route_item("r", r#"{"path_prefix": "api", "policy": "p"}"#)
                .err()
                .unwrap_or_default()
                .contains("must start with `/`")
        );
        assert!(route_item("r", r#"{"policy": "p", "extra": 1}"#).err().unwrap_or_default().contains("expected"));
        assert!(route_item("a.b", r#"{"policy": "p"}"#).err().unwrap_or_default().contains("route name"));
        assert_eq!(route_item("r", r#"{"policy": "p"}"#).unwrap().path_prefix, "/");

        let secret = r#"{"keys": [{"kty": "oct", "kid": "s", "alg": "HS256", "k": "eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHg"}]}"#;
        assert!(static_keys(secret).err().unwrap_or_default().contains("shared secret"));
        assert!(static_keys(r#"{"keys": []}"#).err().unwrap_or_default().contains("no keys"));
        assert!(static_keys("[]").err().unwrap_or_default().contains("expected a JWKS"));

        let ec = r#"{"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}"#;
        let issuer = |audiences: &str| {
            format!(r#"{{"audiences": {audiences}, "algorithms": ["ES256"], "jwks": {{"keys": [{ec}]}}}}"#)
        };
        let none = HashMap::new();
        let made = fleet_issuer("https://fleet.example", &issuer(r#"["api"]"#), &none).unwrap();
        assert_eq!(made.static_keys().len(), 1);
        assert!(
            fleet_issuer("https://fleet.example", &issuer("[]"), &none).err().unwrap_or_default().contains("audience")
        );
        // A leeway past the configured cap, or no algorithm, is refused as in a configuration
        // file (both were taken before).
        let with = |leeway: u64, algorithms: &str| {
            format!(
                r#"{{"audiences": ["api"], "algorithms": {algorithms}, "leeway_secs": {leeway}, "jwks": {{"keys": [{ec}]}}}}"#
            )
        };
        assert!(fleet_issuer("https://fleet.example", &with(MAX_LEEWAY_SECS, r#"["ES256"]"#), &none).is_ok());
        for (leeway, algorithms, why) in [
            (MAX_LEEWAY_SECS + 1, r#"["ES256"]"#, "leeway_secs"),
            (315_360_000, r#"["ES256"]"#, "leeway_secs"),
            (0, "[]", "algorithm"),
        ] {
            let refused =
                fleet_issuer("https://fleet.example", &with(leeway, algorithms), &none).err().unwrap_or_default();
            assert!(refused.contains(why), "{leeway} {algorithms}: {refused}");
        }
        // A key blocked on this sidecar stays blocked when its fleet issuer leaves the items
        // and comes back (it used to be taken from the live key sets, where the issuer no
        // longer was).
        let blocked = HashMap::from([("https://fleet.example".to_owned(), BTreeSet::from(["k1".to_owned()]))]);
        let fleet_keys = |issuers: Vec<Issuer>| FleetKeys { issuers, keys: HashMap::new() };
        let empty = KeySets { version: 1, issuers: HashMap::new() };
        let without = key_sets(&empty, &none, fleet_keys(Vec::new()), &blocked);
        assert!(without.issuers.is_empty());
        let again = fleet_issuer("https://fleet.example", &issuer(r#"["api"]"#), &none).unwrap();
        let with = key_sets(&without, &none, fleet_keys(vec![again]), &blocked);
        assert!(with.issuers["https://fleet.example"].blocked_kids.contains("k1"));
        let local = HashMap::from([("https://fleet.example".to_owned(), Arc::new(made))]);
        let refused = fleet_issuer("https://fleet.example", &issuer(r#"["api"]"#), &local).err().unwrap_or_default();
        assert!(refused.contains("configuration, which wins"), "{refused}");
    }
}
