//! One authorization decision of the RBAC example policy, three ways, in one run:
//!
//! - `fresh_instance`: what Sandgate does per check (new store, instantiate from the
//!   pre-instantiated component, call, drop);
//! - `reused_instance_floor`: one instance called again and again (NO isolation: the floor,
//!   for comparison only);
//! - `native_rust`: the same policy code compiled natively, calling the same data lookups.
//!
//! Then throughput of fresh-instance decisions on 1 and 2 threads, and the per-check cost of
//! each build of the same policies (`wasm32-unknown-unknown` and `wasm32-wasip2`), measured in
//! alternating rounds.
//!
//! Run: `scripts/build-policies.sh && cargo bench -p sandgate-runtime --features bench --bench decision`
//! (JWT verification is not included: the credential is already verified.)
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a benchmark: a failed set-up should stop it loudly"
)]

use criterion::{Criterion, criterion_group};
use sandgate_policy_sdk::{Policy, testing};
use sandgate_runtime::PolicyData;
use sandgate_runtime::ReusedInstance;
use sandgate_runtime::bindings::sandgate::policy::types::{CheckRequest, SnapshotVersions};
use sandgate_runtime::{EvalContext, PolicyModule, Runtime, RuntimeConfig, Start, spec as request};
use sandgate_spec::{FixtureFile, RequestSpec};
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Setup {
    runtime: Runtime,
    module: PolicyModule,
    /// What a serving sidecar does once it has prepared the data version: start prepared.
    context: EvalContext,
    /// The same from the component as built (before preparation, or for a policy without
    /// `prepare`).
    built: EvalContext,
    check: Arc<CheckRequest>,
    spec: RequestSpec,
    data: serde_json::Value,
}

/// The workspace root.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn setup() -> Setup {
    let fixtures = std::fs::read_to_string(root().join("guest-policies/rbac/fixtures.json")).expect("rbac fixtures");
    let data = FixtureFile::parse(&fixtures).expect("valid fixtures").data.expect("rbac data");
    let runtime = Runtime::new(RuntimeConfig::default()).expect("runtime");
    let module = load(&runtime, "rbac");
    let spec: RequestSpec = serde_json::from_value(serde_json::json!({
        "method": "POST", "path": "/api/orders/7", "host": "shop.example",
        "headers": { "authorization": "Bearer x", "user-agent": "bench", "accept": "application/json" },
        "claims": { "iss": "https://issuer.example", "sub": "alice", "aud": "shop", "exp": 1900000000, "roles": ["reader", "writer"] }
    }))
    .expect("request");
    let versions =
        SnapshotVersions { snapshot: 1, policy_digest: module.digest().into(), key_set: 1, revocations: 1, data: 1 };
    let check = Arc::new(request::from_spec(&spec, 1_767_225_600, versions));
    let built = EvalContext { data: Arc::new(PolicyData::new(data.clone(), 1)), verifier: None, start: Start::Built };
    let context = EvalContext { start: Start::Prepared, ..built.clone() };
    assert!(runtime.prepare(&module, &context.data), "the RBAC example must be prepared for its data");
    Setup { runtime, module, context, built, check, spec, data }
}

/// The same check for another path.
fn at_path(check: &CheckRequest, path: &str) -> Arc<CheckRequest> {
    Arc::new(CheckRequest { path: path.into(), ..check.clone() })
}

fn decision(c: &mut Criterion) {
    let s = setup();
    assert!(s.runtime.evaluate(&s.module, &s.check, &s.context).is_allow(), "the benchmark request must be allowed");
    let mut group = c.benchmark_group("rbac_decision");
    group.bench_function("fresh_instance", |b| {
        b.iter(|| black_box(s.runtime.evaluate(&s.module, &s.check, &s.context)))
    });
    group.bench_function("fresh_instance_as_built", |b| {
        b.iter(|| black_box(s.runtime.evaluate(&s.module, &s.check, &s.built)))
    });
    // The guest's bump allocator never frees (its instance is meant to die after one check), so
    // a reused instance is replaced, untimed, every 1,000 calls before it fills its memory.
    group.bench_function("reused_instance_floor", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let chunk = left.min(1_000);
                let mut reused = ReusedInstance::new(&s.runtime, &s.module, &s.context).expect("instance");
                let started = Instant::now();
                for _ in 0..chunk {
                    black_box(reused.check(&s.check).expect("check"));
                }
                elapsed += started.elapsed();
                left -= chunk;
            }
            elapsed
        })
    });
    testing::set_data(s.data.clone());
    let native_request = testing::request_from_spec(&s.spec, 1_767_225_600);
    group.bench_function("native_rust", |b| {
        b.iter(|| black_box(sandgate_policy_rbac::Rbac::check(black_box(&native_request))))
    });
    group.finish();

    // The sandbox alone: the same request through a policy that allows without looking.
    let trivial = load(&s.runtime, "hostile");
    let trivial_check = at_path(&s.check, "/");
    c.bench_function("allow_all/fresh_instance", |b| {
        b.iter(|| black_box(s.runtime.evaluate(&trivial, &trivial_check, &s.context)))
    });
    let wasip2 = load(&s.runtime, "rbac-wasip2");
    c.bench_function("rbac_decision/fresh_instance_wasip2", |b| {
        b.iter(|| black_box(s.runtime.evaluate(&wasip2, &s.check, &s.context)))
    });
}

/// `target/policies/NAME.wasm`, loaded.
fn load(runtime: &Runtime, name: &str) -> PolicyModule {
    let path = root().join(format!("target/policies/{name}.wasm"));
    let bytes =
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run scripts/build-policies.sh)", path.display()));
    runtime.load(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Fresh-instance p50 of each build of RBAC and allow-all, in alternating rounds: the ratio of
/// each `wasm32-wasip2` build to its `wasm32-unknown-unknown` build.
fn builds(s: &Setup) {
    let pairs = [("rbac", "rbac-wasip2", s.check.clone()), ("allow-all", "allow-all-wasip2", at_path(&s.check, "/"))];
    println!(
        "\nper-check cost of each build (fresh instance as built, p50 µs, median of 7 alternating rounds of 20,000):"
    );
    for (base, wasip2, check) in pairs {
        let modules = [load(&s.runtime, base), load(&s.runtime, wasip2)];
        for module in &modules {
            assert!(s.runtime.evaluate(module, &check, &s.built).is_allow(), "the benchmark request must be allowed");
        }
        let mut p50s = [Vec::new(), Vec::new()];
        let mut ratios = Vec::new();
        for _ in 0..7 {
            let round: Vec<f64> = modules
                .iter()
                .map(|module| percentiles(20_000, || drop(black_box(s.runtime.evaluate(module, &check, &s.built)))).0)
                .collect();
            ratios.push(round[1] / round[0]);
            p50s[0].push(round[0]);
            p50s[1].push(round[1]);
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (unknown, p2, ratio) = (median(&mut p50s[0]), median(&mut p50s[1]), median(&mut ratios));
        println!("  {base:<10} wasm32-unknown-unknown {unknown:.2}  wasm32-wasip2 {p2:.2}  ratio {ratio:.2}");
    }
}

/// The RBAC example started prepared against as built, in alternating rounds.
fn prepared_against_built(s: &Setup) {
    let mut rounds: Vec<(f64, f64)> = (0..9)
        .map(|_| {
            let built = percentiles(20_000, || drop(black_box(s.runtime.evaluate(&s.module, &s.check, &s.built)))).0;
            let prepared =
                percentiles(20_000, || drop(black_box(s.runtime.evaluate(&s.module, &s.check, &s.context)))).0;
            (prepared, built)
        })
        .collect();
    rounds.sort_by(|a, b| (a.0 / a.1).total_cmp(&(b.0 / b.1)));
    let (prepared, built) = rounds[4];
    println!(
        "\nprepared / as built = {:.2}x (p50 {prepared:.2} against {built:.2} µs; median of 9 alternating rounds of 20,000, range {:.2}-{:.2}x)",
        prepared / built,
        rounds[0].0 / rounds[0].1,
        rounds[8].0 / rounds[8].1
    );
}

/// Calls of `f` per second over `threads` threads for `duration`.
fn throughput(threads: usize, duration: Duration, f: &(dyn Fn() + Sync)) -> f64 {
    let started = Instant::now();
    let total: u64 = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut n = 0u64;
                    while started.elapsed() < duration {
                        for _ in 0..256 {
                            f();
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

/// p50 and p99 of `f` over `n` individually timed calls, in µs.
fn percentiles(n: usize, mut f: impl FnMut()) -> (f64, f64) {
    let mut samples: Vec<Duration> = (0..n)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed()
        })
        .collect();
    samples.sort_unstable();
    let at = |q: f64| samples[((n as f64 * q) as usize).min(n - 1)].as_secs_f64() * 1e6;
    (at(0.50), at(0.99))
}

fn scaling() {
    let s = Arc::new(setup());
    let n = 100_000;
    // Before any reused instance has left its pool slots full of mapped pages.
    prepared_against_built(&s);
    let (fresh50, fresh99) = percentiles(n, || {
        black_box(s.runtime.evaluate(&s.module, &s.check, &s.context));
    });
    let mut reused = ReusedInstance::new(&s.runtime, &s.module, &s.context).expect("instance");
    let mut calls = 0;
    let (reused50, reused99) = percentiles(n, || {
        calls += 1;
        if calls % 1_000 == 0 {
            reused = ReusedInstance::new(&s.runtime, &s.module, &s.context).expect("instance");
        }
        black_box(reused.check(&s.check).expect("check"));
    });
    testing::set_data(s.data.clone());
    let native_request = testing::request_from_spec(&s.spec, 1_767_225_600);
    let (native50, native99) = percentiles(n, || {
        black_box(sandgate_policy_rbac::Rbac::check(black_box(&native_request)));
    });
    println!("\nper-call latency over {n} calls (µs, includes ~0.03 µs of timer overhead):");
    println!("  fresh_instance         p50 {fresh50:.2}  p99 {fresh99:.2}");
    println!(
        "  reused_instance_floor  p50 {reused50:.2}  p99 {reused99:.2}  (every 1,000th call also re-instantiates)"
    );
    println!("  native_rust            p50 {native50:.2}  p99 {native99:.2}");
    println!("  fresh / floor = {:.2}x, fresh / native = {:.2}x", fresh50 / reused50, fresh50 / native50);

    // One thread against two, for fresh-instance decisions and for the same policy compiled
    // natively (what this machine's two cores give any CPU-bound code), in alternating rounds:
    // this machine's speed drifts by tens of percent over seconds, so only ratios within a
    // round are compared.
    let fresh = || drop(black_box(s.runtime.evaluate(&s.module, &s.check, &s.context)));
    let native = || drop(black_box(sandgate_policy_rbac::Rbac::check(black_box(&native_request))));
    throughput(2, Duration::from_millis(500), &fresh); // warm up both threads' pool slots
    for (name, f) in [("fresh-instance", &fresh as &(dyn Fn() + Sync)), ("native", &native)] {
        let mut rounds: Vec<(f64, f64)> = (0..7)
            .map(|_| (throughput(1, Duration::from_secs(1), f), throughput(2, Duration::from_secs(1), f)))
            .collect();
        rounds.sort_by(|a, b| (a.1 / a.0).total_cmp(&(b.1 / b.0)));
        let (one, two) = rounds[rounds.len() / 2];
        println!(
            "{}{name} throughput: 1 thread {one:.0}/s, 2 threads {two:.0}/s, ratio {:.2}x \
             (median of 7 alternating rounds of 1 s, range {:.2}-{:.2}x)",
            if name == "native" { "" } else { "\n" },
            two / one,
            rounds[0].1 / rounds[0].0,
            rounds[6].1 / rounds[6].0
        );
    }
    builds(&s);
    polluted_slot(&s);
}

/// A slot one check dirtied (1 MiB written) against a clean one: the hostile policy's cheap
/// allow, timed for the 1,000 checks that follow one `/write-1mib` check, against the 1,000
/// that follow one more cheap check, in 9 alternating rounds. One thread, one module: every
/// check runs in the same slot (the pool gives a module back the slot it last used).
fn polluted_slot(s: &Setup) {
    let hostile = load(&s.runtime, "hostile");
    let clean = at_path(&s.check, "/");
    let polluting = at_path(&s.check, "/write-1mib");
    let written = s.runtime.evaluate(&hostile, &polluting, &s.context);
    assert!(written.is_allow(), "the 1 MiB write must be allowed: {:?}", written.fault);
    let after = |first: &Arc<CheckRequest>| {
        black_box(s.runtime.evaluate(&hostile, first, &s.context));
        let mut first_check = 0.0;
        let started = Instant::now();
        for i in 0..1_000 {
            let one = Instant::now();
            black_box(s.runtime.evaluate(&hostile, &clean, &s.context));
            if i == 0 {
                first_check = one.elapsed().as_secs_f64() * 1e6;
            }
        }
        (started.elapsed().as_secs_f64() * 1e6 / 1_000.0, first_check)
    };
    let (mut ratios, mut firsts) = (Vec::new(), Vec::new());
    for _ in 0..9 {
        let (base, base_first) = after(&clean);
        let (dirty, dirty_first) = after(&polluting);
        ratios.push(dirty / base);
        firsts.push((dirty_first, base_first));
    }
    ratios.sort_by(f64::total_cmp);
    firsts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (dirty_first, base_first) = firsts[firsts.len() / 2];
    println!(
        "\npolluted slot (1 MiB written by one check): the next 1,000 checks cost {:.2}x those after a clean check \
         (median of 9 alternating rounds, range {:.2}-{:.2}); the first check after it {dirty_first:.1} µs (after a clean one {base_first:.1} µs)",
        ratios[4], ratios[0], ratios[8]
    );
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
