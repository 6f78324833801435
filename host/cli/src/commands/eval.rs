//! `sandgate eval`: one decision, printed as JSON.

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// The policy component (`.wasm`).
    #[arg(long)]
    policy: PathBuf,
    /// The request, as JSON.
    #[arg(long)]
    request: PathBuf,
    /// The policy's data document, as JSON.
    #[arg(long)]
    data: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (runtime, module, check, context) = super::prepare(&args.policy, &args.request, args.data.as_deref())?;
    let evaluation = runtime.evaluate(&module, &check, &context);
    println!("{}", serde_json::to_string_pretty(&sandgate_runtime::spec::evaluation_json(&evaluation))?);
    Ok(ExitCode::SUCCESS)
}
