//! `sandgate pull oci://… --out FILE`: fetch a policy module, verified against its digests.

use super::registry::{RegistryArgs, parse_reference};
use anyhow::Context;
use sandgate_registry::TagFallback;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// `oci://HOST[:PORT]/REPOSITORY:TAG` or `oci://HOST[:PORT]/REPOSITORY@sha256:…`.
    reference: String,
    /// Where to write the module.
    #[arg(long, short)]
    out: PathBuf,
    /// Also store it in this module cache (e.g. to seed a sidecar's `[registry] cache_dir`).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    #[command(flatten)]
    registry: RegistryArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let reference = parse_reference(&args.reference)?;
    let registry = args.registry.registry(&reference, args.cache_dir)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let pulled = runtime.block_on(registry.pull(&reference, TagFallback::Never))?;
    let mut partial = args.out.clone().into_os_string();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    std::fs::write(&partial, &pulled.module)
        .and_then(|()| std::fs::rename(&partial, &args.out))
        .with_context(|| format!("cannot write `{}`", args.out.display()))?;
    eprintln!(
        "pulled {} ({} bytes, module {}) to {}",
        pulled.pinned(),
        pulled.module.len(),
        pulled.layer_digest,
        args.out.display()
    );
    println!("{}", pulled.manifest_digest);
    Ok(ExitCode::SUCCESS)
}
