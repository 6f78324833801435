//! A plain loop of fresh-instance decisions (then of reused-instance calls), for `perf record`
//! and quick before/after comparisons of runtime or guest changes:
//!
//! ```sh
//! cargo build --release -p sandgate-runtime --features bench-internals --example profile_decision
//! perf record -g target/release/examples/profile_decision target/policies/rbac.wasm 300000
//! ```
//!
//! A third argument `full` sets `full_memory_reset` (every page reset, as when swap is on);
//! `prepared` starts every check from the policy prepared for the data (`Start::Prepared`).
//!
//! The request is the decision benchmark's (RBAC `POST /api/orders/7`, roles `reader, writer`,
//! data `examples/rbac-data.json`); any policy module can be given.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "an example: a failed set-up should stop it loudly"
)]

use sandgate_runtime::PolicyData;
use sandgate_runtime::ReusedInstance;
use sandgate_runtime::bindings::sandgate::policy::types::SnapshotVersions;
use sandgate_runtime::{EvalContext, Runtime, RuntimeConfig, Start, spec as request};
use sandgate_spec::RequestSpec;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let module_path = args.next().unwrap_or_else(|| "target/policies/rbac.wasm".into());
    let n: u64 = args.next().map_or(Ok(200_000), |s| s.parse())?;
    // A third argument `full`: reset all of each instance's memory (as with swap on);
    // `prepared`: start from the policy prepared for the data.
    let third = args.next();
    let full_memory_reset = third.as_deref() == Some("full");
    let start = if third.as_deref() == Some("prepared") { Start::Prepared } else { Start::Built };
    let runtime = Runtime::new(RuntimeConfig { full_memory_reset, ..Default::default() })?;
    let module = runtime.load(&std::fs::read(&module_path)?)?;
    let data = serde_json::from_str(&std::fs::read_to_string("examples/rbac-data.json")?)?;
    let spec: RequestSpec = serde_json::from_value(serde_json::json!({
        "method": "POST", "path": "/api/orders/7", "host": "shop.example",
        "headers": { "authorization": "Bearer x", "user-agent": "bench", "accept": "application/json" },
        "claims": { "iss": "https://issuer.example", "sub": "alice", "aud": "shop", "exp": 1900000000, "roles": ["reader", "writer"] }
    }))?;
    let versions =
        SnapshotVersions { snapshot: 1, policy_digest: module.digest().into(), key_set: 1, revocations: 1, data: 1 };
    let check = Arc::new(request::from_spec(&spec, 1_767_225_600, versions));
    let context = EvalContext { data: Arc::new(PolicyData::new(data, 1)), verifier: None, start };
    anyhow::ensure!(runtime.evaluate(&module, &check, &context).fault.is_none(), "the policy faults on this request");

    let started = Instant::now();
    for _ in 0..n {
        std::hint::black_box(runtime.evaluate(&module, &check, &context));
    }
    println!("{module_path}: fresh instance {:.2} µs/decision", started.elapsed().as_secs_f64() * 1e6 / n as f64);

    // The floor: one instance per 1,000 calls (the guest's bump allocator never frees).
    let mut timed = Duration::ZERO;
    for _ in 0..n.div_ceil(1000) {
        let mut reused = ReusedInstance::new(&runtime, &module, &context)?;
        let started = Instant::now();
        for _ in 0..1000 {
            std::hint::black_box(reused.check(&check)?);
        }
        timed += started.elapsed();
    }
    println!(
        "{module_path}: reused instance {:.2} µs/call",
        timed.as_secs_f64() * 1e6 / (n.div_ceil(1000) * 1000) as f64
    );
    Ok(())
}
