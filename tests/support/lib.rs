//! Shared helpers for Sandgate's integration tests: the compiled policies, and check requests.

use sandgate::bindings::sandgate::policy::types::{CheckRequest, Decision, SnapshotVersions};
use sandgate::host_calls::PolicyData;
use sandgate::{EvalContext, PolicyModule, Runtime, RuntimeConfig, request};
use sandgate_spec::{FixtureFile, RequestSpec};
use std::path::PathBuf;
use std::sync::Arc;

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The bytes of a compiled policy from `target/policies/` (built by `scripts/build-policies.sh`).
pub fn policy_bytes(name: &str) -> Vec<u8> {
    let path = workspace().join("target/policies").join(format!("{name}.wasm"));
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}; run scripts/build-policies.sh first", path.display()))
}

/// A runtime with default limits but a small pool.
pub fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig { max_instances: 32, ..Default::default() }).unwrap()
}

/// Load a compiled policy.
pub fn load(runtime: &Runtime, name: &str) -> PolicyModule {
    runtime.load(&policy_bytes(name)).unwrap_or_else(|e| panic!("cannot load `{name}`: {e}"))
}

/// A fixture file of an example policy.
pub fn fixtures(policy: &str) -> FixtureFile {
    let path = workspace().join("guest-policies").join(policy).join("fixtures.json");
    FixtureFile::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A check request from its JSON form.
pub fn check(json: serde_json::Value) -> CheckRequest {
    let spec: RequestSpec = serde_json::from_value(json).unwrap();
    let versions =
        SnapshotVersions { snapshot: 1, policy_digest: String::new(), key_set: 0, revocations: 0, data: 1 };
    request::from_spec(&spec, 1_767_225_600, versions)
}

/// An evaluation context with this data document.
pub fn context(data: serde_json::Value) -> EvalContext {
    EvalContext { data: Arc::new(PolicyData::new(data, 1)), verifier: None }
}

/// The value of an upstream header set by an allow; panics on a deny.
pub fn allowed_header(decision: &Decision, name: &str) -> String {
    match decision {
        Decision::Allow(a) => a.set_headers.iter().find(|h| h.name == name).map(|h| h.value.clone()).unwrap_or_default(),
        Decision::Deny(d) => panic!("expected allow, got deny {} {}", d.status, d.reason),
    }
}
