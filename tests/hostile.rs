//! Each hostile behaviour becomes a deny with its own reason code, and the runtime keeps
//! serving: a normal policy evaluated right after, and at the same time, answers correctly.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test: a failed set-up should stop it loudly"
)]

use sandgate_runtime::{LoadError, PolicyFault, Runtime, RuntimeConfig, Start};
use sandgate_tests::{allowed_header, check, context, fixtures, load, policy_bytes, runtime};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

const CASES: [(&str, &str); 9] = [
    ("/loop", "policy_timeout"),
    ("/memory-bomb", "policy_out_of_memory"),
    ("/recursion", "policy_stack_overflow"),
    ("/panic", "policy_panicked"),
    ("/abort", "policy_panicked"),
    ("/oversized", "policy_decision_too_large"),
    ("/malformed", "policy_malformed_decision"),
    // What the host copies out of a policy's memory is bounded (`MAX_TRANSFER`): in its answer,
    // and in a call into the host. What the host did not copy is in `tests/transfer_bound.rs`.
    ("/alias-decision", "policy_transfer_too_large"),
    ("/log-huge", "policy_transfer_too_large"),
];

fn reader_request() -> std::sync::Arc<sandgate_runtime::bindings::sandgate::policy::types::CheckRequest> {
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
        matches!(&error, LoadError::UnsupportedImport(name) if name == "wasi:http/outgoing-handler@0.2.0"),
        "{error}"
    );
    assert!(error.to_string().contains("`wasi:http/outgoing-handler@0.2.0`"), "the error names the import: {error}");
    // The standard library's sockets, in a wasm32-wasip2 build: refused the same way.
    let error = runtime.load(&policy_bytes("hostile-socket-wasip2")).err().expect("sockets must be refused");
    assert!(matches!(&error, LoadError::UnsupportedImport(name) if name.starts_with("wasi:sockets/")), "{error}");
}

/// A `wasm32-wasip2` policy attacking WASI gets nothing: each attempt is a deny with its own
/// reason (and the policy's own words in the log), and the runtime keeps serving.
#[test]
fn wasi_attacks_are_denies_with_their_reason_and_the_runtime_keeps_serving() {
    let runtime = runtime();
    let hostile = load(&runtime, "hostile-wasip2");
    assert!(hostile.uses_wasi());
    let rbac = load(&runtime, "rbac-wasip2");
    let rbac_data = context(fixtures("rbac").data.unwrap());
    let cases = [
        ("/wasi/file", "policy_panicked", Some("cannot open a file")),
        ("/wasi/env", "policy_panicked", Some("cannot read the environment")),
        ("/wasi/clock-spin", "policy_timeout", None),
        ("/wasi/exit", "policy_exited", None),
        ("/wasi/handles", "policy_trap", None),
    ];
    for (path, reason, logged) in cases {
        let evaluation = runtime.evaluate(&hostile, &check(json!({ "path": path })), &context(Value::Null));
        assert!(!evaluation.is_allow(), "{path} was allowed");
        assert_eq!(evaluation.reason(), reason, "{path}: {:?}", evaluation.fault);
        if let Some(logged) = logged {
            assert!(
                evaluation.logs.iter().any(|l| l.level == "warn" && l.message.contains(logged)),
                "{path}: the panic message reaches the log through stderr: {:?}",
                evaluation.logs
            );
        }
        let next = runtime.evaluate(&rbac, &reader_request(), &rbac_data);
        assert_eq!(allowed_header(&next.decision, "x-user"), "alice", "after {path}");
    }
    for (path, reason) in CASES {
        let evaluation = runtime.evaluate(&hostile, &check(json!({ "path": path })), &context(Value::Null));
        assert_eq!(evaluation.reason(), reason, "{path} (wasip2): {:?}", evaluation.fault);
    }
}

/// What a `wasm32-wasip2` policy can observe is fixed by the check: the pinned `now`, no
/// environment, no arguments, an empty stdin, randomness derived from the request id; a sleep
/// returns at once on virtual time; stdout and stderr become log lines.
#[test]
fn wasi_is_deterministic_and_never_blocks() {
    let runtime = runtime();
    let hostile = load(&runtime, "hostile-wasip2");
    let observe = |id: &str, now: u64| {
        let mut request = (*check(json!({ "path": "/wasi/observe" }))).clone();
        (request.request_id, request.now) = (id.into(), now);
        let request = std::sync::Arc::new(request);
        let evaluation = runtime.evaluate(&hostile, &request, &context(Value::Null));
        assert!(evaluation.is_allow(), "{:?}", evaluation.fault);
        ["x-wall-clock", "x-random", "x-stdin", "x-env-count", "x-args-count"]
            .map(|h| allowed_header(&evaluation.decision, h))
    };
    let first = observe("req-1", 1_700_000_000);
    assert_eq!(first[0], "1700000000", "the wall clock reads the pinned now");
    assert_eq!(&first[2..], ["0", "0", "0"], "empty stdin, environment and arguments");
    assert_eq!(observe("req-1", 1_700_000_000), first, "the same check sees the same things: replay is exact");
    assert_ne!(observe("req-2", 1_700_000_000)[1], first[1], "another request id, other random bytes");

    let started = std::time::Instant::now();
    let slept = runtime.evaluate(&hostile, &check(json!({ "path": "/wasi/sleep" })), &context(Value::Null));
    assert_eq!(allowed_header(&slept.decision, "x-slept-secs"), "3600", "{:?}", slept.fault);
    assert!(started.elapsed() < Duration::from_secs(60), "an hour's sleep is virtual");

    let printed = runtime.evaluate(&hostile, &check(json!({ "path": "/wasi/print" })), &context(Value::Null));
    assert!(printed.is_allow());
    let logs: Vec<(&str, &str)> = printed.logs.iter().map(|l| (l.level, l.message.as_str())).collect();
    assert_eq!(logs, [("info", "hello from stdout"), ("warn", "hello from stderr")]);
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
                runtime.check(&hostile, check(json!({ "path": "/loop" })), context(Value::Null)).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let queued = runtime.check(&hostile, check(json!({ "path": "/" })), context(Value::Null)).await;
    assert_eq!(queued.fault, Some(PolicyFault::Overloaded));
    assert!(
        matches!(queued.decision, sandgate_runtime::bindings::sandgate::policy::types::Decision::Deny(ref d) if d.status == 503)
    );
    for task in busy {
        assert_eq!(task.await.unwrap().fault, Some(PolicyFault::Timeout));
    }
    let after = runtime.check(&hostile, check(json!({ "path": "/" })), context(Value::Null)).await;
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
                runtime.check(&hostile, check(json!({ "path": "/loop" })), context(Value::Null)).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let data = fixtures("rbac").data.unwrap();
    for _ in 0..20 {
        let (runtime, rbac, data) = (runtime.clone(), rbac.clone(), data.clone());
        let other = tokio::spawn(async move { runtime.check(&rbac, reader_request(), context(data)).await });
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

/// `wasmtime-wasi` enters tokio for WASI's blocking calls (a `println!`, a sleep), which would
/// panic inside an async context; `Runtime::evaluate` called from one (a replay reading a
/// stream) still answers.
#[tokio::test]
async fn a_wasip2_policy_evaluated_inside_an_async_context_still_answers() {
    let runtime = runtime();
    let hostile = load(&runtime, "hostile-wasip2");
    for path in ["/wasi/print", "/wasi/sleep"] {
        let evaluation = runtime.evaluate(&hostile, &check(json!({ "path": path })), &context(Value::Null));
        assert!(evaluation.is_allow(), "{path}: {:?}", evaluation.fault);
    }
}

/// Counts the tokens the host was asked to verify; rejects them all.
#[derive(Default)]
struct CountingVerifier {
    calls: std::sync::atomic::AtomicUsize,
}

impl sandgate_runtime::TokenVerifier for CountingVerifier {
    fn verify(
        &self,
        _token: &str,
    ) -> Result<
        sandgate_runtime::bindings::sandgate::policy::types::VerifiedCredential,
        sandgate_runtime::bindings::sandgate::policy::types::CredentialError,
    > {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Err(sandgate_runtime::bindings::sandgate::policy::types::CredentialError {
            reason: "malformed_token".into(),
            message: "not a JWT".into(),
        })
    }
}

/// A policy cannot make the host verify tokens without bound: `verify-jwt` work happens outside
/// the guest's memory cap and, with `capture = "input"`, every answer was kept for the decision
/// record (10,000 calls in one check kept 10,000 answers). Past [`MAX_VERIFY_JWT`] calls, and
/// for a token longer than [`MAX_VERIFY_JWT_BYTES`], the policy gets an error without the host
/// verifying anything.
///
/// [`MAX_VERIFY_JWT`]: sandgate_runtime::MAX_VERIFY_JWT
/// [`MAX_VERIFY_JWT_BYTES`]: sandgate_runtime::MAX_VERIFY_JWT_BYTES
#[tokio::test]
async fn a_policy_cannot_make_the_host_verify_tokens_without_bound() {
    use sandgate_runtime::{EvalContext, MAX_VERIFY_JWT, PolicyData};
    use std::sync::atomic::Ordering;
    let runtime = runtime();
    let hostile = load(&runtime, "hostile");
    let message = |decision: &sandgate_runtime::bindings::sandgate::policy::types::Decision| match decision {
        sandgate_runtime::bindings::sandgate::policy::types::Decision::Deny(d) => d.message.clone(),
        other => panic!("expected a deny, got {other:?}"),
    };
    for (path, expected_calls, expected_answers) in [
        (
            "/verify-flood",
            MAX_VERIFY_JWT as usize,
            format!("malformed_token={MAX_VERIFY_JWT} too_many_verifications={}", 10_000 - MAX_VERIFY_JWT),
        ),
        ("/verify-huge", 0, "token_too_large=1".to_owned()),
    ] {
        let verifier = Arc::new(CountingVerifier::default());
        let context = EvalContext {
            data: Arc::new(PolicyData::new(Value::Null, 1)),
            verifier: Some(verifier.clone()),
            start: Start::Built,
        };
        let evaluation = runtime.check(&hostile, check(json!({ "path": path })), context).await;
        assert_eq!(evaluation.fault, None, "{path}");
        assert_eq!(message(&evaluation.decision), expected_answers, "{path}");
        assert_eq!(verifier.calls.load(Ordering::Relaxed), expected_calls, "{path}: tokens the host verified");
    }
}
