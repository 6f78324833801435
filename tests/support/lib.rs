//! Shared helpers for Sandgate's integration tests: the compiled policies (built on first use,
//! so `cargo test` works on a fresh clone), check requests, and an authorizer without sockets.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test support: a failed set-up fails the test that asked for it"
)]

use sandgate_runtime::PolicyData;
use sandgate_runtime::bindings::sandgate::policy::types::{CheckRequest, Decision, SnapshotVersions};
use sandgate_runtime::{EvalContext, PolicyModule, Runtime, RuntimeConfig, Start, spec as request};
use sandgate_spec::{FixtureFile, RequestSpec};
use std::path::PathBuf;
use std::sync::Arc;

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every fixture policy a test loads, with the guest crate it is built from and the fixture
/// version it is built with (`versioned` answers a header naming it). A `-wasip2` name is the
/// crate built for `wasm32-wasip2`.
const FIXTURES: [(&str, &str, Option<&str>); 12] = [
    ("rbac", "rbac", None),
    ("tenant", "tenant", None),
    ("scopes", "scopes", None),
    ("hostile", "hostile", None),
    ("allow-all", "allow-all", None),
    ("bad-import", "bad-import", None),
    ("versioned-v1", "versioned", Some("1")),
    ("versioned-v2", "versioned", Some("2")),
    ("rbac-wasip2", "rbac", None),
    ("hostile-wasip2", "hostile", None),
    ("allow-all-wasip2", "allow-all", None),
    ("hostile-socket-wasip2", "hostile-socket", None),
];

/// The bytes of a compiled policy from `target/policies/`. `scripts/build-policies.sh` builds
/// them all; a policy missing there is built on first use (one test process at a time).
pub fn policy_bytes(name: &str) -> Vec<u8> {
    let dir = workspace().join("target/policies");
    let path = dir.join(format!("{name}.wasm"));
    if !path.is_file() {
        build_fixture(name, &dir, &path);
    }
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn build_fixture(name: &str, dir: &std::path::Path, path: &std::path::Path) {
    let Some((_, crate_name, version)) = FIXTURES.iter().find(|(n, _, _)| *n == name) else {
        panic!("`{name}` is not a fixture policy (known: {:?})", FIXTURES.map(|f| f.0))
    };
    std::fs::create_dir_all(dir).unwrap();
    let lock = std::fs::File::create(dir.join(".build.lock")).unwrap();
    lock.lock().unwrap();
    if path.is_file() {
        return; // another test process built it while this one waited
    }
    // SAFETY (of the environment change): the variable is read only by the cargo child this
    // call starts, and test processes build fixtures under the lock above.
    if let Some(version) = version {
        unsafe { std::env::set_var("SANDGATE_FIXTURE_VERSION", version) };
    }
    let target = match name.ends_with("-wasip2") {
        true => sandgate_tooling::policy_build::Target::Wasip2,
        false => sandgate_tooling::policy_build::Target::Unknown,
    };
    let built =
        sandgate_tooling::policy_build::build_policy(&workspace().join("guest-policies").join(crate_name), target);
    if version.is_some() {
        unsafe { std::env::remove_var("SANDGATE_FIXTURE_VERSION") };
    }
    let (component, _) = built.unwrap_or_else(|e| panic!("cannot build fixture `{name}`: {e:#}"));
    let partial = path.with_extension("wasm.partial");
    std::fs::write(&partial, component).unwrap();
    std::fs::rename(&partial, path).unwrap();
}

/// The `sandgate` binary, built as `scripts/build-policies.sh` builds it when missing.
pub fn sandgate_binary() -> PathBuf {
    let path = workspace().join("target/release/sandgate");
    if !path.is_file() {
        let status = std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["build", "--release", "--bin", "sandgate"])
            .current_dir(workspace())
            .status()
            .expect("cargo runs");
        assert!(status.success(), "cannot build the sandgate binary");
    }
    path
}

/// An authorizer for `config` without listeners, its decision log discarded.
pub fn authorizer(config: &sandgate_server::Config) -> Arc<sandgate_server::Authorizer> {
    // Callable from plain tests and from inside a multi-threaded tokio test.
    let load = sandgate_server::State::from_config(config);
    let state = match tokio::runtime::Handle::try_current() {
        Ok(handle) => tokio::task::block_in_place(|| handle.block_on(load)),
        Err(_) => tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(load),
    }
    .unwrap();
    let counter = state.metrics.decision_log_dropped.clone();
    let (log, _writer) = sandgate_server::DecisionLog::start(Box::new(std::io::sink()), 1024, counter).unwrap();
    let server = &config.server;
    Arc::new(sandgate_server::Authorizer::new(
        state,
        server.identity_headers.clone(),
        server.token_cache_size,
        log,
        tokio_util::task::TaskTracker::new(),
    ))
}

/// A runtime with default limits but a small pool and four evaluation threads.
pub fn runtime() -> Runtime {
    // Four evaluation threads, any of them for one policy: concurrency tests get concurrency
    // whatever the machine's core count.
    Runtime::new(RuntimeConfig { max_instances: 32, eval_threads: 4, max_threads_per_policy: 4, ..Default::default() })
        .unwrap()
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
pub fn check(json: serde_json::Value) -> Arc<CheckRequest> {
    let spec: RequestSpec = serde_json::from_value(json).unwrap();
    let versions = SnapshotVersions { snapshot: 1, policy_digest: String::new(), key_set: 0, revocations: 0, data: 1 };
    Arc::new(request::from_spec(&spec, 1_767_225_600, versions))
}

/// An evaluation context with this data document.
pub fn context(data: serde_json::Value) -> EvalContext {
    EvalContext { data: Arc::new(PolicyData::new(data, 1)), verifier: None, start: Start::Built }
}

/// The value of an upstream header set by an allow; panics on a deny.
pub fn allowed_header(decision: &Decision, name: &str) -> String {
    match decision {
        Decision::Allow(a) => {
            a.set_headers.iter().find(|h| h.name == name).map(|h| h.value.clone()).unwrap_or_default()
        }
        Decision::Deny(d) => panic!("expected allow, got deny {} {}", d.status, d.reason),
    }
}
