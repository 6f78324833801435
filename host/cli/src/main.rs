//! The `sandgate` command line: parse, dispatch to one file per subcommand, print the error
//! chain. Exit codes: 0 success (any decision), 1 failing fixtures, 2 bad input or a failure,
//! 64 an unusable configuration.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod commands;
mod demo;

/// mimalloc instead of glibc's malloc: a check allocates and frees many small buffers across
/// threads (hyper, the evaluation pool, the decision log), where glibc spent ~15% of a loaded
/// sidecar's CPU (docs/BENCHMARKS.md, "The request path").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sandgate",
    version,
    about = "Authorization sidecar running each check's policy in a fresh WebAssembly sandbox"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the authorization sidecar. Without `--config`: a demo with the bundled RBAC
    /// policy, a generated key, and a printed token and curl lines.
    Serve(commands::serve::Args),
    /// Evaluate one request with a policy and print the decision as JSON.
    ///
    /// The request file is JSON: {"method": "GET", "path": "/api/x", "headers": {"name": "value"},
    /// "claims": {...}} where `claims` are treated as a verified token (see docs/REQUEST_JSON.md).
    Eval(commands::eval::Args),
    /// Build a policy crate into a validated component; print its digest and size.
    Build(commands::build::Args),
    /// Create a policy crate: an example check, a native unit test, a fixtures file.
    New(commands::new::Args),
    /// Run a policy's fixture cases against its compiled component, through the real runtime.
    ///
    /// With a crate directory (default `.`): builds it, then runs `<crate>/fixtures.json`.
    /// With `--policy`: runs an already built component.
    Test(commands::test::Args),
    /// Measure per-decision latency of a policy on one request (fresh instance each time).
    Bench(commands::bench::Args),
    /// Push a policy component to an OCI registry (CNCF Wasm layout); print the manifest digest.
    Push(commands::push::Args),
    /// Pull a policy module from an OCI registry, verified by digest; print the manifest digest.
    Pull(commands::pull::Args),
    /// Change a fleet's desired state in NATS JetStream, or read its sidecars' status.
    Fleet(commands::fleet::Args),
    /// Decide recorded checks again from their decision records (`capture = "input"`) and
    /// report every difference; with `--candidate`, the decisions a new module would change.
    Replay(commands::replay::Args),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Serve(args) => commands::serve::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Build(args) => commands::build::run(args),
        Command::New(args) => commands::new::run(args),
        Command::Test(args) => commands::test::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Push(args) => commands::push::run(args),
        Command::Pull(args) => commands::pull::run(args),
        Command::Fleet(args) => commands::fleet::run(args),
        Command::Replay(args) => commands::replay::run(args),
    };
    result.unwrap_or_else(|error| {
        eprintln!("error: {error:#}");
        match error.downcast_ref::<sandgate_server::ConfigError>() {
            Some(_) => ExitCode::from(64),
            None => ExitCode::from(2),
        }
    })
}
