//! `sandgate push FILE.wasm oci://HOST/REPO:TAG`: a validated policy component → an OCI
//! artifact in the CNCF Wasm layout; prints the manifest digest.

use super::registry::{RegistryArgs, parse_reference};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// The policy component (`.wasm`), e.g. from `sandgate build`.
    file: PathBuf,
    /// Where to push it: `oci://HOST[:PORT]/REPOSITORY:TAG`.
    reference: String,
    #[command(flatten)]
    registry: RegistryArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let reference = parse_reference(&args.reference)?;
    let component = super::read(&args.file, "policy")?;
    // Only what the sidecar would load is pushed.
    super::small_runtime()?
        .load(&component)
        .map_err(|e| anyhow::anyhow!(e))
        .map_err(|e| e.context(format!("`{}` is not a loadable policy component", args.file.display())))?;
    let registry = args.registry.registry(&reference, None)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let pushed = runtime.block_on(registry.push(&component, &reference))?;
    eprintln!(
        "pushed {} ({} bytes, module {}) to {reference}\npin it as {}",
        args.file.display(),
        component.len(),
        pushed.layer_digest,
        pushed.pinned
    );
    println!("{}", pushed.manifest_digest);
    Ok(ExitCode::SUCCESS)
}
