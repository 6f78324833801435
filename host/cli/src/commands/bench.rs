//! `sandgate bench`: per-decision latency of a policy on one request, a fresh instance each.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// The policy component (`.wasm`).
    policy: PathBuf,
    /// The request, as JSON (as for `eval`).
    #[arg(long)]
    request: PathBuf,
    /// The policy's data document, as JSON.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Decisions to time.
    #[arg(long, default_value_t = 20_000)]
    iterations: usize,
    /// Start every check from the component as built, even if the policy prepares for its
    /// data (`prepare`); by default checks start prepared, as a sidecar's do once it has
    /// prepared the data version.
    #[arg(long)]
    as_built: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let iterations = args.iterations;
    anyhow::ensure!(iterations > 0, "--iterations must be at least 1");
    let (runtime, module, check, mut context) = super::prepare(&args.policy, &args.request, args.data.as_deref())?;
    if args.as_built {
        context.start = sandgate_runtime::Start::Built;
    }
    let first = runtime.evaluate(&module, &check, &context);
    for _ in 0..iterations.min(1_000) {
        runtime.evaluate(&module, &check, &context);
    }
    let started = Instant::now();
    let mut samples: Vec<Duration> = (0..iterations)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(runtime.evaluate(&module, &check, &context));
            t.elapsed()
        })
        .collect();
    let total = started.elapsed();
    samples.sort_unstable();
    let at = |q: f64| percentile_us(&samples, q);
    let outcome = if first.is_allow() { "allow" } else { "deny" };
    let start = if first.prepared { "prepared for its data" } else { "as built" };
    println!(
        "{}: {} ({outcome}), {iterations} decisions, fresh instance each, started {start}",
        args.policy.display(),
        first.reason()
    );
    println!("  p50 {:.2} µs   p90 {:.2} µs   p99 {:.2} µs   max {:.2} µs", at(0.50), at(0.90), at(0.99), at(1.0));
    println!("  {:.0} decisions/s on one thread", iterations as f64 / total.as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

/// The `q` quantile of sorted `samples`, in microseconds.
fn percentile_us(samples: &[Duration], q: f64) -> f64 {
    let index = ((samples.len() as f64 * q) as usize).min(samples.len().saturating_sub(1));
    samples.get(index).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}
