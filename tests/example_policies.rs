//! The example policies' fixture tables pass as Wasm through the real runtime, and every case
//! gives exactly the same outcome natively as in Wasm.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test: a failed set-up should stop it loudly"
)]

use sandgate_policy_sdk::{Policy, testing};
use sandgate_tests::{fixtures, load, runtime};
use sandgate_tooling::fixture_runner;

fn same_outcomes_natively_and_as_wasm<P: Policy>(name: &str) {
    let runtime = runtime();
    let module = load(&runtime, name);
    let file = fixtures(name);
    assert!(file.cases.len() >= 5, "`{name}` needs a real table of cases");
    let wasm = fixture_runner::run(&runtime, &module, &file, sandgate_server::unix_now());
    for (case, result) in file.cases.iter().zip(&wasm) {
        assert!(result.verdict.is_ok(), "{name} as Wasm, case `{}`: {:?}", case.name, result.verdict);
        testing::set_data(case.data.clone().or_else(|| file.data.clone()).unwrap_or_default());
        let native = testing::outcome(&P::check(&testing::request_from_spec(&case.request, file.now.unwrap_or(0))));
        assert_eq!(native, result.got, "{name}, case `{}`: native and Wasm disagree", case.name);
    }
}

#[test]
fn rbac() {
    same_outcomes_natively_and_as_wasm::<sandgate_policy_rbac::Rbac>("rbac");
}

#[test]
fn tenant_isolation() {
    same_outcomes_natively_and_as_wasm::<sandgate_policy_tenant::TenantIsolation>("tenant");
}

#[test]
fn oauth_scopes() {
    same_outcomes_natively_and_as_wasm::<sandgate_policy_scopes::Scopes>("scopes");
}

/// `sandgate build` folds the import shim into the policy module: a check instantiates the
/// policy and the fixup that fills its import table, not a third shim instance.
#[test]
fn built_policies_instantiate_two_core_instances() {
    for name in ["rbac", "tenant", "scopes"] {
        let bytes = sandgate_tests::policy_bytes(name);
        assert_eq!(sandgate_tooling::import_shim::core_instantiations(&bytes).unwrap(), 2, "{name}");
    }
}

/// A check's context on data document `data` (version 1), starting as `start` says.
fn data_context(data: serde_json::Value, start: sandgate_runtime::Start) -> sandgate_runtime::EvalContext {
    let data = std::sync::Arc::new(sandgate_runtime::PolicyData::new(data, 1));
    sandgate_runtime::EvalContext { data, verifier: None, start }
}

/// What the RBAC example prepares is its data version's and no other's: a check on new data
/// never starts from the roles parsed for the old, and the sidecar's default start (`Auto`)
/// moves to the prepared one once the background preparation is done.
#[test]
fn rbac_prepared_for_one_data_version_never_answers_for_another() {
    use sandgate_runtime::Start;
    let runtime = runtime();
    let module = load(&runtime, "rbac");
    assert!(module.prepares());
    let request = sandgate_tests::check(serde_json::json!({
        "method": "GET", "path": "/api/orders/7", "claims": { "sub": "alice", "roles": ["reader"] }
    }));
    let readers_may_read = serde_json::json!({ "roles": { "reader": [{ "methods": ["GET"], "paths": ["/api/**"] }] } });
    let readers_may_not =
        serde_json::json!({ "roles": { "reader": [{ "methods": ["GET"], "paths": ["/other/**"] }] } });
    let context = |data: &serde_json::Value, start| data_context(data.clone(), start);
    let before = context(&readers_may_read, Start::Prepared);
    let evaluation = runtime.evaluate(&module, &request, &before);
    assert!(evaluation.prepared && evaluation.is_allow(), "{:?}", evaluation.decision);
    // The new data version: prepared anew, and as built, both deny.
    for start in [Start::Prepared, Start::Built] {
        let evaluation = runtime.evaluate(&module, &request, &context(&readers_may_not, start));
        assert_eq!(evaluation.prepared, start == Start::Prepared);
        assert!(!evaluation.is_allow(), "{start:?}: the roles of the old data answered");
    }
    // A data version seen first by a check in the background: as built, then prepared.
    let other = serde_json::json!({ "roles": { "reader": [{ "methods": ["GET", "HEAD"], "paths": ["/api/**"] }] } });
    let auto = context(&other, Start::Auto);
    let first = runtime.evaluate(&module, &request, &auto);
    assert!(!first.prepared && first.is_allow());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let evaluation = runtime.evaluate(&module, &request, &auto);
        assert!(evaluation.is_allow());
        if evaluation.prepared {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the background preparation never finished");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The same document loaded again (a new snapshot's copy, the old one gone, another
    // document used in between) starts prepared at once, without preparing again.
    let prepared_so_far = runtime.prepare_counts().prepared;
    drop(auto);
    let third = serde_json::json!({ "roles": { "reader": [{ "methods": ["GET"], "paths": ["/**"] }] } });
    assert!(runtime.evaluate(&module, &request, &context(&third, Start::Prepared)).prepared);
    let again = context(&other, Start::Auto);
    let evaluation = runtime.evaluate(&module, &request, &again);
    assert!(evaluation.prepared && evaluation.is_allow());
    assert_eq!(runtime.prepare_counts().prepared, prepared_so_far + 1, "only the third document was prepared");
}

#[test]
fn tenant_prepared_for_one_data_version_never_answers_for_another() {
    use sandgate_runtime::Start;
    let runtime = runtime();
    let module = load(&runtime, "tenant");
    assert!(module.prepares());
    let request = sandgate_tests::check(serde_json::json!({
        "method": "GET", "path": "/tenants/globex/orders",
        "claims": { "sub": "ops", "tenant": "acme", "roles": ["support"] }
    }));
    let context = data_context;
    let support_crosses = context(serde_json::json!({ "cross_tenant_roles": ["support"] }), Start::Prepared);
    let evaluation = runtime.evaluate(&module, &request, &support_crosses);
    assert!(evaluation.prepared && evaluation.is_allow(), "{:?}", evaluation.decision);
    // Another data version, prepared and as built: the old list never answers.
    for start in [Start::Prepared, Start::Built] {
        let evaluation =
            runtime.evaluate(&module, &request, &context(serde_json::json!({ "cross_tenant_roles": [] }), start));
        assert_eq!(evaluation.prepared, start == Start::Prepared);
        assert!(!evaluation.is_allow(), "{start:?}: the cross-tenant roles of the old data answered");
    }
    // A document without the list prepares to no cross-tenant roles, as a check reads it.
    let evaluation = runtime.evaluate(&module, &request, &context(serde_json::json!({}), Start::Prepared));
    assert!(evaluation.prepared && !evaluation.is_allow());
}
