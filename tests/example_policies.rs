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
