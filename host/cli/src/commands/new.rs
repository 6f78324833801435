//! `sandgate new`: a policy crate that builds and tests out of the box.

use sandgate_tooling::scaffold;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// The policy's name (lowercase letters, digits, `-`, `_`).
    name: String,
    /// Where to create it; default `./NAME`.
    #[arg(long)]
    path: Option<PathBuf>,
    /// Depend on the policy SDK crate at this path (e.g. a Sandgate checkout's
    /// `guest-policies/sdk`) instead of `sandgate-policy-sdk` from crates.io.
    #[arg(long)]
    sdk: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let name = args.name;
    let dir = args.path.unwrap_or_else(|| PathBuf::from(&name));
    scaffold::new_policy(&name, &dir, args.sdk.as_deref())?;
    println!("created policy `{name}` in {}", dir.display());
    println!(
        "next:\n  cd {}\n  cargo test        # fixtures, natively\n  sandgate build    # a validated Wasm component (add --target wasm32-wasip2 for the standard library's WASI)\n  sandgate test     # fixtures, through the real runtime",
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
