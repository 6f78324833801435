//! One authorization decision of the RBAC example policy, three ways, in one run:
//!
//! - `fresh_instance`: what Sandgate does per check (new store, instantiate from the
//!   pre-instantiated component, call, drop);
//! - `reused_instance_floor`: one instance called again and again (NO isolation: the floor,
//!   for comparison only);
//! - `native_rust`: the same policy code compiled natively, calling the same data lookups.
//!
//! Then throughput of fresh-instance decisions on 1 and 2 threads.
//!
//! Run: `scripts/build-policies.sh && cargo bench -p sandgate --bench decision`
//! (JWT verification is not included: the credential is already verified.)

use criterion::{Criterion, criterion_group};
use sandgate::bindings::sandgate::policy::types::{CheckRequest, SnapshotVersions};
use sandgate::host_calls::PolicyData;
use sandgate::runtime::ReusedInstance;
use sandgate::{EvalContext, PolicyModule, Runtime, RuntimeConfig, request};
use sandgate_policy_sdk::{Policy, testing};
use sandgate_spec::{FixtureFile, RequestSpec};
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Setup {
    runtime: Runtime,
    module: PolicyModule,
    context: EvalContext,
    check: CheckRequest,
    spec: RequestSpec,
    data: serde_json::Value,
}

fn setup() -> Setup {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let bytes = std::fs::read(root.join("target/policies/rbac.wasm")).expect("run scripts/build-policies.sh first");
    let fixtures = std::fs::read_to_string(root.join("guest-policies/rbac/fixtures.json")).expect("rbac fixtures");
    let data = FixtureFile::parse(&fixtures).expect("valid fixtures").data.expect("rbac data");
    let runtime = Runtime::new(RuntimeConfig::default()).expect("runtime");
    let module = runtime.load(&bytes).expect("rbac loads");
    let spec: RequestSpec = serde_json::from_value(serde_json::json!({
        "method": "POST", "path": "/api/orders/7", "host": "shop.example",
        "headers": { "authorization": "Bearer x", "user-agent": "bench", "accept": "application/json" },
        "claims": { "iss": "https://issuer.example", "sub": "alice", "aud": "shop", "exp": 1900000000, "roles": ["reader", "writer"] }
    }))
    .expect("request");
    let versions = SnapshotVersions { snapshot: 1, policy_digest: module.digest().into(), key_set: 1, revocations: 1, data: 1 };
    let check = request::from_spec(&spec, 1_767_225_600, versions);
    let context = EvalContext { data: Arc::new(PolicyData { value: data.clone(), version: 1 }), verifier: None };
    Setup { runtime, module, context, check, spec, data }
}

fn decision(c: &mut Criterion) {
    let s = setup();
    assert!(s.runtime.evaluate(&s.module, &s.check, &s.context).is_allow(), "the benchmark request must be allowed");
    let mut group = c.benchmark_group("rbac_decision");
    group.bench_function("fresh_instance", |b| b.iter(|| black_box(s.runtime.evaluate(&s.module, &s.check, &s.context))));
    let mut reused = ReusedInstance::new(&s.runtime, &s.module, &s.context).expect("instance");
    group.bench_function("reused_instance_floor", |b| b.iter(|| black_box(reused.check(&s.check).expect("check"))));
    testing::set_data(s.data.clone());
    let native_request = testing::request_from_spec(&s.spec, 1_767_225_600);
    group.bench_function("native_rust", |b| b.iter(|| black_box(sandgate_policy_rbac::Rbac::check(black_box(&native_request)))));
    group.finish();
}

/// Fresh-instance decisions per second over `threads` threads for `duration`.
fn throughput(s: &Arc<Setup>, threads: usize, duration: Duration) -> f64 {
    let started = Instant::now();
    let total: u64 = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut n = 0u64;
                    while started.elapsed() < duration {
                        for _ in 0..256 {
                            black_box(s.runtime.evaluate(&s.module, &s.check, &s.context));
                        }
                        n += 256;
                    }
                    n
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("worker")).sum()
    });
    total as f64 / started.elapsed().as_secs_f64()
}

fn scaling() {
    let s = Arc::new(setup());
    throughput(&s, 2, Duration::from_millis(500)); // warm up both threads' pool slots
    let one = throughput(&s, 1, Duration::from_secs(3));
    let two = throughput(&s, 2, Duration::from_secs(3));
    println!("\nfresh-instance throughput: 1 thread {one:.0}/s, 2 threads {two:.0}/s, ratio {:.2}x", two / one);
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    targets = decision
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    scaling();
}
