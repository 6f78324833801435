//! The `sandgate` command line.

use anyhow::Context;
use clap::{Parser, Subcommand};
use sandgate::bindings::sandgate::policy::types::SnapshotVersions;
use sandgate::host_calls::PolicyData;
use sandgate::{EvalContext, Runtime, RuntimeConfig, fixture_runner, policy_build, request, scaffold};
use sandgate_spec::{FixtureFile, RequestSpec};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "sandgate", version, about = "Authorization sidecar running each check's policy in a fresh WebAssembly sandbox")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the authorization sidecar. Without `--config`: a demo with the bundled RBAC
    /// policy, a generated key, and a printed token and curl lines.
    Serve {
        /// The configuration file (TOML); see examples/sandgate.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen address, overriding the configuration's.
        #[arg(long)]
        listen: Option<String>,
        /// gRPC (Envoy ext_authz) listen address, overriding the configuration's.
        #[arg(long)]
        grpc_listen: Option<String>,
    },
    /// Evaluate one request with a policy and print the decision as JSON.
    ///
    /// The request file is JSON: {"method": "GET", "path": "/api/x", "headers": {"name": "value"},
    /// "claims": {...}} where `claims` are treated as a verified token (see docs/REQUEST_JSON.md).
    Eval {
        /// The policy component (`.wasm`).
        #[arg(long)]
        policy: PathBuf,
        /// The request, as JSON.
        #[arg(long)]
        request: PathBuf,
        /// The policy's data document, as JSON.
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Build a policy crate into a validated component; print its digest and size.
    Build {
        /// The policy crate's directory.
        #[arg(default_value = ".")]
        path: PathBuf,
        /// Where to write the component; default: beside cargo's artifact, as
        /// `<crate>.component.wasm`.
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Write the component even if the runtime refuses to load it (for test fixtures
        /// that must be refused at load).
        #[arg(long, hide = true)]
        no_validate: bool,
    },
    /// Create a policy crate: an example check, a native unit test, a fixtures file.
    New {
        /// The policy's name (lowercase letters, digits, `-`, `_`).
        name: String,
        /// Where to create it; default `./NAME`.
        #[arg(long)]
        path: Option<PathBuf>,
        /// The policy SDK crate; default: the one this binary was built from.
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Run a policy's fixture cases against its compiled component, through the real runtime.
    ///
    /// With a crate directory (default `.`): builds it, then runs `<crate>/fixtures.json`.
    /// With `--policy`: runs an already built component.
    Test {
        /// The policy crate's directory.
        path: Option<PathBuf>,
        /// A built policy component (`.wasm`) instead of building a crate.
        #[arg(long, conflicts_with = "path")]
        policy: Option<PathBuf>,
        /// The fixture file; default `<crate>/fixtures.json`.
        #[arg(long)]
        fixtures: Option<PathBuf>,
    },
    /// Measure per-decision latency of a policy on one request (fresh instance each time).
    Bench {
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
    },
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {what} `{}`", path.display()))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> anyhow::Result<T> {
    serde_json::from_slice(&read(path, what)?).with_context(|| format!("{what} `{}` is not valid", path.display()))
}

fn load(runtime: &Runtime, path: &Path) -> anyhow::Result<sandgate::PolicyModule> {
    runtime.load(&read(path, "policy")?).with_context(|| format!("cannot load policy `{}`", path.display()))
}

async fn serve(config_path: Option<PathBuf>, listen: Option<String>, grpc_listen: Option<String>) -> anyhow::Result<ExitCode> {
    let (mut config, demo_token) = match config_path {
        Some(path) => (sandgate::config::Config::from_file(&path)?, None),
        None => {
            let dir = std::env::temp_dir().join(format!("sandgate-demo-{}", std::process::id()));
            let listen = listen.clone().unwrap_or_else(|| "127.0.0.1:8181".into());
            let (config, token) = sandgate::demo::demo(&dir, sandgate::demo::bundled_policy()?, &listen)?;
            (config, Some(token))
        }
    };
    if let Some(listen) = listen {
        config.server.listen = listen;
    }
    if let Some(listen) = grpc_listen {
        config.grpc.get_or_insert_with(Default::default).listen = listen;
    }
    let app = sandgate::server::App::new(&config)?;
    let listener = tokio::net::TcpListener::bind(&config.server.listen)
        .await
        .with_context(|| format!("cannot listen on `{}`", config.server.listen))?;
    let address = listener.local_addr()?;
    if let Some(admin) = &config.admin {
        let (admin_address, generated_token) = sandgate::admin::start(app.clone(), admin).await?;
        eprintln!("sandgate: admin API on {admin_address}");
        if let Some(token) = generated_token {
            eprintln!("sandgate: admin token (generated, none configured): {token}");
        }
    }
    let (stop_grpc, grpc_stopped) = tokio::sync::oneshot::channel::<()>();
    let grpc_task = match &config.grpc {
        Some(grpc) => {
            let grpc_listener = tokio::net::TcpListener::bind(&grpc.listen)
                .await
                .with_context(|| format!("cannot listen on `{}` (gRPC)", grpc.listen))?;
            eprintln!("sandgate: Envoy ext_authz gRPC on {}", grpc_listener.local_addr()?);
            let stopped = async move {
                let _ = grpc_stopped.await;
            };
            Some(tokio::spawn(sandgate::grpc::serve(app.clone(), grpc_listener, stopped)))
        }
        None => None,
    };
    app.start().await;
    tracing::info!(%address, "sandgate listening");
    eprintln!("sandgate: listening on http://{address} (checks at {}, /healthz, /readyz, /metrics)", config.server.auth_prefix);
    if let Some(token) = demo_token {
        let url = format!("http://{address}{}", config.server.auth_prefix);
        eprintln!("\ndemo token (alice, role reader):\n{token}\n");
        eprintln!("allowed (200):  curl -i -H 'Authorization: Bearer {token}' -H 'X-Original-URI: /api/orders/7' {url}");
        eprintln!("denied (403):   curl -i -H 'Authorization: Bearer {token}' -H 'X-Original-Method: DELETE' -H 'X-Original-URI: /api/orders/7' {url}");
        eprintln!("no token (401): curl -i -H 'X-Original-URI: /api/orders/7' {url}\n");
    }
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    let grace = std::time::Duration::from_secs(config.server.shutdown_grace_secs);
    sandgate::server::serve(app, listener, shutdown, grace).await;
    let _ = stop_grpc.send(());
    if let Some(task) = grpc_task {
        let _ = tokio::time::timeout(grace, task).await;
    }
    Ok(ExitCode::SUCCESS)
}

/// A runtime, the loaded policy, the check request from its JSON file, and the data document:
/// what `eval` and `bench` start from.
fn prepare(
    policy: &Path,
    request_path: &Path,
    data: Option<&Path>,
) -> anyhow::Result<(Runtime, sandgate::PolicyModule, sandgate::bindings::sandgate::policy::types::CheckRequest, EvalContext)> {
    let spec: RequestSpec = read_json(request_path, "request")?;
    let value = match data {
        Some(path) => read_json(path, "data document")?,
        None => serde_json::Value::Null,
    };
    let runtime = Runtime::new(RuntimeConfig { max_instances: 1, ..Default::default() })?;
    let module = load(&runtime, policy)?;
    let versions = SnapshotVersions { snapshot: 0, policy_digest: module.digest().to_owned(), key_set: 0, revocations: 0, data: 1 };
    let check = request::from_spec(&spec, request::unix_now(), versions);
    let context = EvalContext { data: Arc::new(PolicyData::new(value, 1)), verifier: None };
    Ok((runtime, module, check, context))
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve { config, listen, grpc_listen } => {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
                .with_writer(std::io::stderr)
                .init();
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(serve(config, listen, grpc_listen))
        }
        Command::Eval { policy, request: request_path, data } => {
            let (runtime, module, check, context) = prepare(&policy, &request_path, data.as_deref())?;
            let evaluation = runtime.evaluate(&module, &check, &context);
            println!("{}", serde_json::to_string_pretty(&request::evaluation_json(&evaluation))?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Build { path, out, no_validate } => {
            let (component, core_path) = policy_build::build_policy(&path)?;
            if !no_validate {
                let runtime = Runtime::new(RuntimeConfig { max_instances: 1, ..Default::default() })?;
                runtime.load(&component).context("the built component does not pass validation")?;
            }
            let out = out.unwrap_or_else(|| core_path.with_extension("component.wasm"));
            std::fs::write(&out, &component).with_context(|| format!("cannot write `{}`", out.display()))?;
            let digest = sandgate::runtime::sha256_hex(&component);
            println!("built {}\n  sha256 {digest}\n  size   {} bytes", out.display(), component.len());
            Ok(ExitCode::SUCCESS)
        }
        Command::New { name, path, sdk } => {
            let dir = path.unwrap_or_else(|| PathBuf::from(&name));
            scaffold::new_policy(&name, &dir, &sdk.unwrap_or_else(scaffold::default_sdk_path))?;
            println!("created policy `{name}` in {}", dir.display());
            println!("next:\n  cd {}\n  cargo test        # fixtures, natively\n  sandgate build    # a validated Wasm component\n  sandgate test     # fixtures, through the real runtime", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Test { path, policy, fixtures } => {
            let crate_dir = path.unwrap_or_else(|| PathBuf::from("."));
            let fixtures = fixtures.unwrap_or_else(|| crate_dir.join("fixtures.json"));
            let text = String::from_utf8(read(&fixtures, "fixture file")?).context("fixture file is not UTF-8")?;
            let file = FixtureFile::parse(&text).with_context(|| format!("fixture file `{}` is not valid", fixtures.display()))?;
            let runtime = Runtime::new(RuntimeConfig { max_instances: 1, ..Default::default() })?;
            let module = match policy {
                Some(policy) => load(&runtime, &policy)?,
                None => {
                    let (component, _) = policy_build::build_policy(&crate_dir)?;
                    runtime.load(&component).context("the built component does not pass validation")?
                }
            };
            let results = fixture_runner::run(&runtime, &module, &file);
            let failed = results.iter().filter(|r| r.verdict.is_err()).count();
            for result in &results {
                match &result.verdict {
                    Ok(()) => println!("ok      {}", result.name),
                    Err(why) => println!("FAILED  {}\n        {why}\n        got: {}", result.name, result.got),
                }
            }
            println!("{}: {} passed, {failed} failed", fixtures.display(), results.len() - failed);
            Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Bench { policy, request: request_path, data, iterations } => {
            anyhow::ensure!(iterations > 0, "--iterations must be at least 1");
            let (runtime, module, check, context) = prepare(&policy, &request_path, data.as_deref())?;
            let first = runtime.evaluate(&module, &check, &context);
            for _ in 0..iterations.min(1_000) {
                runtime.evaluate(&module, &check, &context);
            }
            let started = std::time::Instant::now();
            let mut samples: Vec<std::time::Duration> = (0..iterations)
                .map(|_| {
                    let t = std::time::Instant::now();
                    std::hint::black_box(runtime.evaluate(&module, &check, &context));
                    t.elapsed()
                })
                .collect();
            let total = started.elapsed();
            samples.sort_unstable();
            let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)].as_secs_f64() * 1e6;
            println!("{}: {} ({}), {iterations} decisions, fresh instance each", policy.display(), first.reason(), if first.is_allow() { "allow" } else { "deny" });
            println!("  p50 {:.2} µs   p90 {:.2} µs   p99 {:.2} µs   max {:.2} µs", at(0.50), at(0.90), at(0.99), at(1.0));
            println!("  {:.0} decisions/s on one thread", iterations as f64 / total.as_secs_f64());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

