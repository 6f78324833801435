//! The `sandgate` command line.

use anyhow::Context;
use clap::{Parser, Subcommand};
use sandgate::bindings::sandgate::policy::types::SnapshotVersions;
use sandgate::host_calls::PolicyData;
use sandgate::{EvalContext, Runtime, RuntimeConfig, fixture_runner, policy_build, request};
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
    /// Run a policy's fixture cases against its compiled component.
    Test {
        /// The policy component (`.wasm`).
        #[arg(long)]
        policy: PathBuf,
        /// The fixture file.
        #[arg(long)]
        fixtures: PathBuf,
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

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Eval { policy, request: request_path, data } => {
            let spec: RequestSpec = read_json(&request_path, "request")?;
            let value = match data {
                Some(path) => read_json(&path, "data document")?,
                None => serde_json::Value::Null,
            };
            let runtime = Runtime::new(RuntimeConfig { max_instances: 1, ..Default::default() })?;
            let module = load(&runtime, &policy)?;
            let versions = SnapshotVersions {
                snapshot: 0,
                policy_digest: module.digest().to_owned(),
                key_set: 0,
                revocations: 0,
                data: 1,
            };
            let check = request::from_spec(&spec, request::unix_now(), versions);
            let context = EvalContext { data: Arc::new(PolicyData { value, version: 1 }), verifier: None };
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
        Command::Test { policy, fixtures } => {
            let text = String::from_utf8(read(&fixtures, "fixture file")?).context("fixture file is not UTF-8")?;
            let file = FixtureFile::parse(&text).with_context(|| format!("fixture file `{}` is not valid", fixtures.display()))?;
            let runtime = Runtime::new(RuntimeConfig { max_instances: 1, ..Default::default() })?;
            let module = load(&runtime, &policy)?;
            let results = fixture_runner::run(&runtime, &module, &file);
            let failed = results.iter().filter(|r| r.verdict.is_err()).count();
            for result in &results {
                match &result.verdict {
                    Ok(()) => println!("ok      {}", result.name),
                    Err(why) => println!("FAILED  {}\n        {why}\n        got: {}", result.name, result.got),
                }
            }
            println!("{} passed, {failed} failed", results.len() - failed);
            Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
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

