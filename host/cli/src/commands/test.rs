//! `sandgate test`: a fixture file's cases through the real runtime.

use anyhow::Context;
use sandgate_spec::FixtureFile;
use sandgate_tooling::{fixture_runner, policy_build};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// The policy crate's directory.
    path: Option<PathBuf>,
    /// A built policy component (`.wasm`) instead of building a crate.
    #[arg(long, conflicts_with = "path")]
    policy: Option<PathBuf>,
    /// The fixture file; default `<crate>/fixtures.json`.
    #[arg(long)]
    fixtures: Option<PathBuf>,
    /// The Rust target to build the crate for: `wasm32-unknown-unknown` or `wasm32-wasip2`.
    #[arg(long, default_value = "wasm32-unknown-unknown", conflicts_with = "policy")]
    target: policy_build::Target,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let crate_dir = args.path.unwrap_or_else(|| PathBuf::from("."));
    let fixtures = args.fixtures.unwrap_or_else(|| crate_dir.join("fixtures.json"));
    let text = String::from_utf8(super::read(&fixtures, "fixture file")?).context("fixture file is not UTF-8")?;
    let file =
        FixtureFile::parse(&text).with_context(|| format!("fixture file `{}` is not valid", fixtures.display()))?;
    let runtime = super::small_runtime()?;
    let module = match args.policy {
        Some(policy) => super::load(&runtime, &policy)?,
        None => super::load_built(&runtime, &policy_build::build_policy(&crate_dir, args.target)?.0)?,
    };
    let results = fixture_runner::run(&runtime, &module, &file, sandgate_server::unix_now());
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
