//! `sandgate build`: a policy crate → a validated component, its digest and size.

use anyhow::Context;
use sandgate_tooling::policy_build;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// The policy crate's directory.
    #[arg(default_value = ".")]
    path: PathBuf,
    /// Where to write the component; default: beside cargo's artifact, as
    /// `<crate>.component.wasm`.
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// The Rust target: `wasm32-unknown-unknown` (no WASI, the fastest checks) or
    /// `wasm32-wasip2` (the standard library's WASI, linked deny-all and deterministic).
    #[arg(long, default_value = "wasm32-unknown-unknown")]
    target: policy_build::Target,
    /// Write the component even if the runtime refuses to load it (for test fixtures
    /// that must be refused at load).
    #[arg(long, hide = true)]
    no_validate: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (component, core_path) = policy_build::build_policy(&args.path, args.target)?;
    let contract = match args.no_validate {
        false => Some(super::load_built(&super::small_runtime()?, &component)?.contract()),
        true => None,
    };
    let out = args.out.unwrap_or_else(|| core_path.with_extension("component.wasm"));
    std::fs::write(&out, &component).with_context(|| format!("cannot write `{}`", out.display()))?;
    let digest = sandgate_runtime::sha256_hex(&component);
    println!("built {}\n  sha256 {digest}\n  size   {} bytes", out.display(), component.len());
    if let Some(contract) = contract {
        println!("  contract sandgate:policy@{}", contract.version());
    }
    Ok(ExitCode::SUCCESS)
}
