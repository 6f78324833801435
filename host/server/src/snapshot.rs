//! Snapshots: everything a check consults, immutable and versioned, swapped atomically.
//!
//! A check pins one `Arc<Snapshot>` when it starts and uses only that: its policy module,
//! data, keys and revocations can never come from two different versions. Writers (JWKS
//! refresh, later the admin API) build a new snapshot from the current one and publish it;
//! in-flight checks finish on the one they pinned.

use arc_swap::ArcSwap;
use sandgate_auth::{KeySets, Revocations};
use sandgate_runtime::bindings::sandgate::policy::types::{CredentialError, SnapshotVersions, VerifiedCredential};
use sandgate_runtime::{PolicyData, PolicyModule, TokenVerifier};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// A loaded policy.
#[derive(Clone)]
pub struct LoadedPolicy {
    /// Its id.
    pub id: String,
    /// The compiled, pre-instantiated component.
    pub module: PolicyModule,
    /// Its data document.
    pub data: Arc<PolicyData>,
    /// When it was loaded.
    pub loaded_at: SystemTime,
    /// A candidate version evaluated beside this one on every check, never affecting the
    /// answer (shadow evaluation).
    pub shadow: Option<PolicyModule>,
    /// The OCI artifact the module was pulled from; `None` for a file or an upload.
    pub source: Option<Arc<OciSource>>,
}

/// Where an OCI-pulled module came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciSource {
    /// The reference as configured or asked for (perhaps a tag).
    pub requested: String,
    /// The reference pinned to the manifest digest it resolved to: `oci://HOST/REPO@sha256:…`.
    pub pinned: String,
}

/// A routing rule.
#[derive(Debug, Clone)]
pub struct Route {
    /// Lowercase host without port; `None` matches any.
    pub host: Option<String>,
    /// Path prefix, matched on segment boundaries.
    pub path_prefix: String,
    /// Policy id.
    pub policy: String,
}

impl Route {
    /// Whether a request for `host` and (canonical) `path` takes this route. The prefix matches
    /// on segment boundaries and ignores ASCII case, so `/ADMIN` takes the `/admin` route on an
    /// upstream that ignores case too.
    fn matches(&self, host: &str, path: &str) -> bool {
        let host_ok = self.host.as_deref().is_none_or(|h| h.eq_ignore_ascii_case(host));
        let prefix = self.path_prefix.trim_end_matches('/');
        let rest = path
            .get(..prefix.len())
            .filter(|head| head.eq_ignore_ascii_case(prefix))
            .and_then(|_| path.get(prefix.len()..));
        let path_ok = prefix.is_empty() || rest.is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
        host_ok && path_ok
    }
}

/// Everything a check consults.
#[derive(Default)]
pub struct Snapshot {
    /// Bumped on every publish.
    pub version: u64,
    /// Policies by id.
    pub policies: HashMap<String, Arc<LoadedPolicy>>,
    /// Routes in order.
    pub routes: Arc<[Route]>,
    /// Policy for unrouted requests.
    pub default_policy: Option<String>,
    /// Issuers and keys.
    pub keys: Arc<KeySets>,
    /// Revocations.
    pub revocations: Arc<Revocations>,
    /// In a fleet: the bucket revision this snapshot is exactly.
    pub fleet_revision: Option<u64>,
}

impl Snapshot {
    /// The route and policy for a request; `None` when nothing matches and there is no default.
    pub fn route(&self, host: &str, path: &str) -> Option<(&str, &Arc<LoadedPolicy>)> {
        let id = self.matching_route(host, path).map(|r| r.policy.as_str()).or(self.default_policy.as_deref())?;
        self.policies.get(id).map(|p| (id, p))
    }

    /// The route a request for `host` and (canonical) `path` takes, as decision records name
    /// it: `[host]/prefix`, or `default` for the default policy; `None` when nothing matches.
    pub fn route_label(&self, host: &str, path: &str) -> Option<Cow<'_, str>> {
        match self.matching_route(host, path) {
            Some(Route { host: Some(host), path_prefix, .. }) => Some(Cow::Owned(format!("{host}{path_prefix}"))),
            Some(Route { host: None, path_prefix, .. }) => Some(Cow::Borrowed(path_prefix)),
            None => self.default_policy.as_ref().map(|_| Cow::Borrowed("default")),
        }
    }

    /// The first route matching `host` (a port, and the trailing dot of a fully qualified
    /// name, ignored) and `path`.
    fn matching_route(&self, host: &str, path: &str) -> Option<&Route> {
        let host =
            host.rsplit_once(':').filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit())).map_or(host, |(h, _)| h);
        // `api.example.` is `api.example` (a fully qualified name): nginx strips the dot, others do not.
        let host = host.strip_suffix('.').unwrap_or(host);
        self.routes.iter().find(|r| r.matches(host, path))
    }

    /// The versions a check with `policy` logs and passes to the policy.
    pub fn versions(&self, policy: &LoadedPolicy) -> SnapshotVersions {
        SnapshotVersions {
            snapshot: self.version,
            policy_digest: policy.module.digest().to_owned(),
            key_set: self.keys.version,
            revocations: self.revocations.version,
            data: policy.data.version,
        }
    }

    /// A copy sharing every part, for a writer to change one part of.
    pub fn next(&self) -> Snapshot {
        Snapshot {
            version: self.version,
            policies: self.policies.clone(),
            routes: self.routes.clone(),
            default_policy: self.default_policy.clone(),
            keys: self.keys.clone(),
            revocations: self.revocations.clone(),
            fleet_revision: self.fleet_revision,
        }
    }
}

/// A policy's `verify-jwt` import verifies with the snapshot its check pinned.
impl TokenVerifier for Snapshot {
    fn verify(&self, token: &str) -> Result<VerifiedCredential, CredentialError> {
        self.keys
            .verify(token, &self.revocations)
            .map(crate::credential::verified)
            .map_err(|r| crate::credential::rejected(&r))
    }
}

/// The current snapshot, and the one way to replace it.
pub struct SnapshotStore {
    current: ArcSwap<Snapshot>,
    writer: Mutex<()>,
}

impl SnapshotStore {
    /// A store holding `initial`.
    pub fn new(initial: Snapshot) -> Self {
        SnapshotStore { current: ArcSwap::from_pointee(initial), writer: Mutex::new(()) }
    }

    /// Pin the current snapshot.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Publish a snapshot derived from the current one by `change`, with the next version.
    /// Writers are serialised, so no change is lost to a concurrent one. Returns the new
    /// snapshot, live for every check that starts after this returns.
    pub fn update(&self, change: impl FnOnce(&mut Snapshot)) -> Arc<Snapshot> {
        match self.try_update::<std::convert::Infallible>(|next| {
            change(next);
            Ok(())
        }) {
            Ok(next) => next,
        }
    }

    /// Like [`SnapshotStore::update`], but `change` may refuse: then nothing is published and
    /// its error is returned.
    pub fn try_update<E>(&self, change: impl FnOnce(&mut Snapshot) -> Result<(), E>) -> Result<Arc<Snapshot>, E> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.current.load_full();
        let mut next = current.next();
        change(&mut next)?;
        next.version = current.version + 1;
        let next = Arc::new(next);
        self.current.store(next.clone());
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::Route;

    #[test]
    fn routes_match_on_segment_boundaries_and_host() {
        let r = Route { host: Some("api.example".into()), path_prefix: "/api".into(), policy: "p".into() };
        assert!(r.matches("api.example", "/api"));
        assert!(r.matches("API.example", "/api/x"));
        assert!(!r.matches("api.example", "/apix"));
        assert!(!r.matches("other.example", "/api/x"));
        // Case cannot dodge a route.
        assert!(r.matches("api.example", "/API/x"));
        assert!(r.matches("api.example", "/Api"));
        assert!(!r.matches("api.example", "/APIX"));
        let any = Route { host: None, path_prefix: "/".into(), policy: "p".into() };
        assert!(any.matches("x", "/anything"));
    }
}
