//! Applying the fleet's desired state: one new snapshot that is exactly the bucket at one
//! revision, built from the current one. Modules are pulled and compiled first (off the
//! request path, on the compiler thread); an item that cannot be applied keeps its previous
//! version and is reported.

use super::desired::{DesiredState, Key, PolicyItem, RevocationItem};
use crate::snapshot::{LoadedPolicy, OciSource};
use crate::state::State;
use sandgate_auth::Revocations;
use sandgate_registry::{ModuleRef, TagFallback};
use sandgate_runtime::{PolicyData, PolicyModule};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

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

impl State {
    /// Publish the snapshot `desired` describes, with `fleet_revision = desired.revision`;
    /// revocations whose `until` is not after `now` are left out. Returns the items that could
    /// not be applied (each keeps its previous version).
    pub async fn apply_desired(&self, desired: &DesiredState, now: u64) -> Vec<ItemError> {
        let _writes = self.module_writes.lock().await;
        let current = self.store.load();
        let mut errors = Vec::new();
        let mut modules: HashMap<String, (PolicyModule, Option<Arc<OciSource>>)> = HashMap::new();
        let mut data: HashMap<String, Arc<PolicyData>> = HashMap::new();
        let mut jtis = HashSet::new();
        let mut subjects = HashSet::new();
        for (key, (value, revision)) in &desired.items {
            let fail = |error: String| ItemError { key: key.clone(), revision: *revision, error };
            match Key::parse(key) {
                Some(Key::Policy(id)) => match self.fleet_module(&current, &id, key, *revision, value).await {
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
                Some(Key::Data(id)) => {
                    let old = current.policies.get(&id).map(|p| p.data.clone());
                    match old {
                        Some(old) if old.version == *revision => {
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
                    errors.push(fail("the revoked id is not base64url: nothing was revoked by this key".into()));
                }
                None => {}
            }
        }
        self.store.update(|s| {
            let mut policies = HashMap::new();
            for (id, (module, source)) in modules {
                let old = s.policies.get(&id);
                let data = data
                    .get(&id)
                    .cloned()
                    .or_else(|| old.filter(|o| o.data.version == 0).map(|o| o.data.clone()))
                    .unwrap_or_else(|| Arc::new(PolicyData::default()));
                let unchanged = old.is_some_and(|o| {
                    o.module.digest() == module.digest() && o.source == source && Arc::ptr_eq(&o.data, &data)
                });
                let loaded = match old {
                    Some(old) if unchanged => old.clone(),
                    _ => Arc::new(LoadedPolicy {
                        id: id.clone(),
                        module,
                        data,
                        loaded_at: SystemTime::now(),
                        shadow: old.and_then(|o| o.shadow.clone()),
                        source,
                    }),
                };
                policies.insert(id, loaded);
            }
            s.policies = policies;
            if s.revocations.jtis != jtis || s.revocations.subjects != subjects {
                s.revocations = Arc::new(Revocations { version: s.revocations.version + 1, jtis, subjects });
            }
            s.fleet_revision = Some(desired.revision);
        });
        errors
    }

    /// The module `value` (a `policy.<id>` item) names: the one serving if it names the same
    /// reference, else pulled, verified, compiled and probed.
    async fn fleet_module(
        &self,
        current: &crate::Snapshot,
        id: &str,
        key: &str,
        revision: u64,
        value: &str,
    ) -> Result<(PolicyModule, Option<Arc<OciSource>>), String> {
        let item: PolicyItem =
            serde_json::from_str(value).map_err(|e| format!("expected {{\"module\": \"oci://…\"}}: {e}"))?;
        if let Some(old) = current.policies.get(id)
            && old.source.as_ref().is_some_and(|s| s.requested == item.module)
        {
            return Ok((old.module.clone(), old.source.clone()));
        }
        // An item that failed is not pulled again for every later batch (a revocation must not
        // wait out a registry's timeouts each time): it is tried again when it is written again.
        if let Some(error) = self.fleet.as_ref().and_then(|f| f.failed_item(key, revision)) {
            return Err(error);
        }
        let result = self.pull_and_compile(&item.module).await;
        if let (Err(error), Some(fleet)) = (&result, &self.fleet) {
            fleet.remember_failure(key, revision, error);
        }
        result
    }

    async fn pull_and_compile(&self, module: &str) -> Result<(PolicyModule, Option<Arc<OciSource>>), String> {
        let reference: ModuleRef = module.parse().map_err(|e: sandgate_registry::BadReference| e.to_string())?;
        let pulled = self
            .registry
            .pull(&reference, TagFallback::WhenUnreachable)
            .await
            .map_err(|e| sandgate_auth::error_chain(&e))?;
        let module = self
            .compile(pulled.module.clone(), Some(&pulled.manifest_digest))
            .await
            .map_err(|e| sandgate_auth::error_chain(&e))?;
        Ok((module, Some(crate::state::oci_source(&pulled))))
    }
}

/// Whether a revocation item is in force at `now`.
fn in_force(value: &str, now: u64) -> Result<bool, String> {
    let item: RevocationItem =
        serde_json::from_str(value).map_err(|e| format!("expected {{\"until\": UNIX_SECONDS}} or {{}}: {e}"))?;
    Ok(item.until.is_none_or(|until| until > now))
}
