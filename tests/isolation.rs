//! No state survives a request: a policy that counts in a `static`, a global cache, a
//! `thread_local` and a lazily initialised global sees 1 every time, sequentially and under
//! concurrency. The same policy on one reused instance sees its counters grow, which shows the
//! check below would catch a runtime that leaked state.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test: a failed set-up should stop it loudly"
)]

use sandgate_runtime::ReusedInstance;
use sandgate_runtime::{Runtime, RuntimeConfig, Start};
use sandgate_tests::{allowed_header, check, context, load, runtime};
use std::sync::Arc;

const STATE_HEADERS: [&str; 4] = ["x-static-counter", "x-global-cache", "x-thread-local", "x-lazy-global"];

#[test]
fn fresh_state_on_every_sequential_check() {
    fresh_state_sequentially(&runtime(), "hostile");
}

/// The same for the policy built for `wasm32-wasip2` (the standard library's WASI linked).
#[test]
fn fresh_state_on_every_sequential_check_of_a_wasip2_build() {
    fresh_state_sequentially(&runtime(), "hostile-wasip2");
}

/// The same with every page of memory reset after each check (what the runtime does when swap
/// is on, since the written-page scan cannot see swapped-out pages).
#[test]
fn fresh_state_on_every_sequential_check_with_a_full_memory_reset() {
    fresh_state_sequentially(
        &Runtime::new(RuntimeConfig { max_instances: 4, full_memory_reset: true, ..Default::default() }).unwrap(),
        "hostile",
    );
}

/// Statics, the global cache, thread-locals and lazies count 1 every time, and no check finds
/// the marker the one before it left in memory.
fn fresh_state_sequentially(runtime: &Runtime, policy: &str) {
    let hostile = load(runtime, policy);
    let request = check(serde_json::json!({ "path": "/state" }));
    let residue = check(serde_json::json!({ "path": "/residue" }));
    for i in 0..1_000 {
        let evaluation = runtime.evaluate(&hostile, &request, &context(serde_json::Value::Null));
        for header in STATE_HEADERS {
            assert_eq!(allowed_header(&evaluation.decision, header), "1", "check {i}: `{header}` survived a request");
        }
        let evaluation = runtime.evaluate(&hostile, &residue, &context(serde_json::Value::Null));
        assert_eq!(allowed_header(&evaluation.decision, "x-residue"), "clean", "check {i}: memory of an earlier check");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fresh_state_on_every_concurrent_check() {
    fresh_state_concurrently("hostile").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fresh_state_on_every_concurrent_check_of_a_wasip2_build() {
    fresh_state_concurrently("hostile-wasip2").await;
}

async fn fresh_state_concurrently(policy: &'static str) {
    let runtime = Arc::new(runtime());
    let hostile = load(&runtime, policy);
    let request = check(serde_json::json!({ "path": "/state" }));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (runtime, hostile, request) = (runtime.clone(), hostile.clone(), request.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                for _ in 0..20 {
                    let evaluation = runtime.check(&hostile, request.clone(), context(serde_json::Value::Null)).await;
                    seen.push(STATE_HEADERS.map(|h| allowed_header(&evaluation.decision, h)));
                    tokio::task::yield_now().await;
                }
                seen
            })
        })
        .collect();
    let mut checks = 0;
    for task in tasks {
        for counts in task.await.unwrap() {
            assert_eq!(counts, ["1", "1", "1", "1"], "state survived a request under concurrency");
            checks += 1;
        }
    }
    assert_eq!(checks, 1_000);
}

#[test]
fn a_reused_instance_does_leak_state_so_the_checks_above_can_fail() {
    let runtime = runtime();
    let hostile = load(&runtime, "hostile");
    let request = check(serde_json::json!({ "path": "/state" }));
    let mut instance = ReusedInstance::new(&runtime, &hostile, &context(serde_json::Value::Null)).unwrap();
    let decisions: Vec<_> = (0..5).map(|_| instance.check(&request).unwrap()).collect();
    for header in STATE_HEADERS {
        let counts: Vec<String> = decisions.iter().map(|d| allowed_header(d, header)).collect();
        assert_eq!(counts, ["1", "2", "3", "4", "5"], "`{header}` on a reused instance");
    }
    let residue = check(serde_json::json!({ "path": "/residue" }));
    let seen: Vec<String> = (0..2).map(|_| allowed_header(&instance.check(&residue).unwrap(), "x-residue")).collect();
    assert_eq!(seen, ["clean", "found"], "a reused instance keeps what the last check wrote");
}

#[test]
fn a_normal_check_never_grows_guest_memory() {
    let runtime = runtime();
    let rbac = load(&runtime, "rbac");
    let data = sandgate_tests::fixtures("rbac").data.unwrap();
    let request = check(
        serde_json::json!({ "path": "/api/orders/7", "claims": { "sub": "alice", "roles": ["reader", "writer"] } }),
    );
    let evaluation = runtime.evaluate(&rbac, &request, &context(data));
    assert!(evaluation.is_allow());
    assert_eq!(evaluation.memory_grows, 0, "the guest called memory.grow on a normal request");
}

/// A policy prepared for its data (`prepare` ran once and its memory was kept) starts every
/// check from that memory: the counters `prepare` bumped read 2 in every check, never more, and
/// no check finds the marker the one before it left.
#[test]
fn fresh_state_on_every_check_of_a_prepared_policy() {
    let runtime = runtime();
    let hostile = load(&runtime, "hostile");
    assert!(hostile.prepares());
    let mut context = context(serde_json::json!({ "prepare": "state" }));
    context.start = Start::Prepared;
    let request = check(serde_json::json!({ "path": "/state" }));
    let residue = check(serde_json::json!({ "path": "/residue" }));
    for i in 0..1_000 {
        let evaluation = runtime.evaluate(&hostile, &request, &context);
        assert!(evaluation.prepared, "check {i} did not start prepared");
        for header in STATE_HEADERS {
            assert_eq!(allowed_header(&evaluation.decision, header), "2", "check {i}: `{header}`");
        }
        let evaluation = runtime.evaluate(&hostile, &residue, &context);
        assert_eq!(allowed_header(&evaluation.decision, "x-residue"), "clean", "check {i}: memory of an earlier check");
    }
    // As built, the same checks count from nothing.
    context.start = Start::Built;
    let evaluation = runtime.evaluate(&hostile, &request, &context);
    assert!(!evaluation.prepared);
    assert_eq!(allowed_header(&evaluation.decision, "x-static-counter"), "1");
}

/// A `prepare` that never returns is stopped; the preparation fails and checks start from the
/// component as built, deciding as usual.
#[test]
fn a_prepare_that_never_returns_is_stopped_and_checks_start_as_built() {
    let runtime = runtime();
    let hostile = load(&runtime, "hostile");
    let data = Arc::new(sandgate_runtime::PolicyData::new(serde_json::json!({ "prepare": "loop" }), 1));
    assert!(!runtime.prepare(&hostile, &data), "a looping prepare was kept");
    let mut context = context(serde_json::json!({ "prepare": "loop" }));
    context.start = Start::Prepared;
    let evaluation = runtime.evaluate(&hostile, &check(serde_json::json!({ "path": "/state" })), &context);
    assert!(!evaluation.prepared);
    assert_eq!(allowed_header(&evaluation.decision, "x-static-counter"), "1");
}

/// A policy that declines to prepare (the SDK's default `prepare`) is asked once per data
/// version, not on every check that asks for a prepared start (a replay's).
#[test]
fn a_declined_preparation_is_not_tried_again_for_the_same_data() {
    let runtime = runtime();
    let allow_all = load(&runtime, "allow-all");
    assert!(allow_all.prepares(), "SDK policies export `prepare`");
    let mut context = context(serde_json::json!({ "any": "data" }));
    context.start = Start::Prepared;
    for _ in 0..50 {
        let evaluation = runtime.evaluate(&allow_all, &check(serde_json::json!({ "path": "/" })), &context);
        assert!(!evaluation.prepared && evaluation.is_allow());
    }
    let counts = runtime.prepare_counts();
    assert_eq!((counts.prepared, counts.declined, counts.failed), (0, 1, 0));
}
