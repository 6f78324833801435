//! Each hostile behaviour becomes a deny with its own reason code, and the runtime keeps
//! serving: a normal policy evaluated right after, and at the same time, answers correctly.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test: a failed set-up should stop it loudly"
)]

use sandgate_runtime::{LoadError, PolicyFault, Runtime, RuntimeConfig};
use sandgate_tests::{allowed_header, check, context, fixtures, load, policy_bytes, runtime};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

const CASES: [(&str, &str); 7] = [
    ("/loop", "policy_timeout"),
    ("/memory-bomb", "policy_out_of_memory"),
    ("/recursion", "policy_stack_overflow"),
    ("/panic", "policy_panicked"),
    ("/abort", "policy_panicked"),
    ("/oversized", "policy_decision_too_large"),
    ("/malformed", "policy_malformed_decision"),
];

fn reader_request() -> sandgate_runtime::bindings::sandgate::policy::types::CheckRequest {
    check(json!({ "path": "/api/orders/7", "claims": { "sub": "alice", "roles": ["reader"] } }))
}

#[test]
fn each_hostile_behaviour_is_a_deny_with_its_own_reason_and_the_next_check_is_fine() {
    let runtime = runtime();
    let hostile = load(&runtime, "hostile");
    let rbac = load(&runtime, "rbac");
    let rbac_data = context(fixtures("rbac").data.unwrap());
    for (path, reason) in CASES {
        let evaluation = runtime.evaluate(&hostile, &check(json!({ "path": path })), &context(Value::Null));
        assert!(!evaluation.is_allow(), "{path} was allowed");
        assert_eq!(evaluation.reason(), reason, "{path}: {:?}", evaluation.fault);
        assert!(evaluation.fault.is_some(), "{path}: a host-made deny must carry its fault");

        let next = runtime.evaluate(&rbac, &reader_request(), &rbac_data);
        assert_eq!(allowed_header(&next.decision, "x-user"), "alice", "after {path}");
    }
    // The same hostile module still answers a harmless request.
    let fine = runtime.evaluate(&hostile, &check(json!({ "path": "/" })), &context(Value::Null));
    assert!(fine.is_allow());
}

#[test]
fn hostile_checks_running_concurrently_do_not_disturb_normal_ones() {
    let runtime = Arc::new(runtime());
    let hostile = load(&runtime, "hostile");
    let rbac = load(&runtime, "rbac");
    let rbac_data = context(fixtures("rbac").data.unwrap());
    std::thread::scope(|scope| {
        for (path, reason) in CASES {
            let (runtime, hostile) = (runtime.clone(), hostile.clone());
            scope.spawn(move || {
                for _ in 0..3 {
                    let evaluation = runtime.evaluate(&hostile, &check(json!({ "path": path })), &context(Value::Null));
                    assert_eq!(evaluation.reason(), reason, "{path} under concurrency");
                }
            });
        }
        for _ in 0..4 {
            let (runtime, rbac, data) = (runtime.clone(), rbac.clone(), rbac_data.clone());
            scope.spawn(move || {
                for i in 0..500 {
                    let evaluation = runtime.evaluate(&rbac, &reader_request(), &data);
                    assert_eq!(allowed_header(&evaluation.decision, "x-user"), "alice", "normal check {i}");
                }
            });
        }
    });
}

#[test]
fn a_module_importing_what_the_host_lacks_is_refused_at_load() {
    let runtime = runtime();
    let error = runtime.load(&policy_bytes("bad-import")).err().expect("bad-import must be refused");
    assert!(
        matches!(&error, LoadError::UnsupportedImport(name) if name == "wasi:filesystem/preopens@0.2.0"),
        "{error}"
    );
    assert!(error.to_string().contains("`wasi:filesystem/preopens@0.2.0`"), "the error names the import: {error}");
}

#[test]
fn time_and_memory_limits_are_configurable() {
    let runtime = Runtime::new(RuntimeConfig {
        max_instances: 4,
        timeout: Duration::from_millis(5),
        memory_limit: 2 << 20,
        ..Default::default()
    })
    .unwrap();
    let hostile = load(&runtime, "hostile");
    let started = std::time::Instant::now();
    let evaluation = runtime.evaluate(&hostile, &check(json!({ "path": "/loop" })), &context(Value::Null));
    assert_eq!(evaluation.fault, Some(PolicyFault::Timeout));
    // Behaviour, not speed: a 5 ms budget must not behave like the 100 ms default.
    assert!(started.elapsed() < Duration::from_millis(90), "took {:?}", started.elapsed());
    let evaluation = runtime.evaluate(&hostile, &check(json!({ "path": "/memory-bomb" })), &context(Value::Null));
    assert_eq!(evaluation.fault, Some(PolicyFault::OutOfMemory));
    // Under the 2 MiB cap a normal policy still works.
    let rbac = load(&runtime, "rbac");
    let ok = runtime.evaluate(&rbac, &reader_request(), &context(fixtures("rbac").data.unwrap()));
    assert!(ok.is_allow());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_pool_queues_then_answers_overloaded_never_allow() {
    let runtime = Arc::new(
        Runtime::new(RuntimeConfig {
            max_instances: 2,
            timeout: Duration::from_millis(300),
            queue_timeout: Duration::from_millis(20),
            // Both looping checks run at once (one policy may take both threads here).
            eval_threads: 2,
            max_threads_per_policy: 2,
            ..Default::default()
        })
        .unwrap(),
    );
    let hostile = load(&runtime, "hostile");
    let busy: Vec<_> = (0..2)
        .map(|_| {
            let (runtime, hostile) = (runtime.clone(), hostile.clone());
            tokio::spawn(async move {
                runtime.check(&hostile, Arc::new(check(json!({ "path": "/loop" }))), context(Value::Null)).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let queued = runtime.check(&hostile, Arc::new(check(json!({ "path": "/" }))), context(Value::Null)).await;
    assert_eq!(queued.fault, Some(PolicyFault::Overloaded));
    assert!(
        matches!(queued.decision, sandgate_runtime::bindings::sandgate::policy::types::Decision::Deny(ref d) if d.status == 503)
    );
    for task in busy {
        assert_eq!(task.await.unwrap().fault, Some(PolicyFault::Timeout));
    }
    let after = runtime.check(&hostile, Arc::new(check(json!({ "path": "/" }))), context(Value::Null)).await;
    assert!(after.is_allow(), "the pool recovers once instances are free");
}

/// A looping policy hammered by many clients takes at most its share of the evaluation
/// threads, and never an async worker: another policy's check is still answered, and long
/// before the loops are done. (When policies ran on the async workers, 16 loops of 400 ms
/// held both workers for over 3 s, and nothing else was answered meanwhile.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_policy_cannot_take_every_thread_from_other_policies() {
    let runtime = Arc::new(
        Runtime::new(RuntimeConfig {
            max_instances: 32,
            timeout: Duration::from_millis(400),
            queue_timeout: Duration::from_millis(200),
            eval_threads: 2,
            max_threads_per_policy: 1,
            ..Default::default()
        })
        .unwrap(),
    );
    let hostile = load(&runtime, "hostile");
    let rbac = load(&runtime, "rbac");
    let loops: Vec<_> = (0..16)
        .map(|_| {
            let (runtime, hostile) = (runtime.clone(), hostile.clone());
            tokio::spawn(async move {
                runtime.check(&hostile, Arc::new(check(json!({ "path": "/loop" }))), context(Value::Null)).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let data = fixtures("rbac").data.unwrap();
    for _ in 0..20 {
        let (runtime, rbac, data) = (runtime.clone(), rbac.clone(), data.clone());
        let other = tokio::spawn(async move { runtime.check(&rbac, Arc::new(reader_request()), context(data)).await });
        // A liveness bound, not a speed measurement: the loops alone take over 3 s.
        let answer =
            tokio::time::timeout(Duration::from_secs(2), other).await.expect("answered while the loops run").unwrap();
        assert!(answer.is_allow(), "a check of another policy was {:?}", answer.fault);
    }
    let mut faults: Vec<_> = Vec::new();
    for task in loops {
        faults.push(task.await.unwrap().fault);
    }
    // One loop at a time ran to its time limit; the rest waited past their queue timeout.
    assert!(faults.contains(&Some(PolicyFault::Timeout)), "{faults:?}");
    assert!(faults.contains(&Some(PolicyFault::Overloaded)), "{faults:?}");
    assert!(faults.iter().all(|f| matches!(f, Some(PolicyFault::Timeout | PolicyFault::Overloaded))), "{faults:?}");
}
