//! Turning a policy crate into a component: `cargo build` for `wasm32-unknown-unknown`, then
//! wrap the core module as a component of the `sandgate:policy/authorizer` world.
//!
//! Why not `wasm32-wasip2`: its standard library imports WASI (files, clocks, environment), so
//! every policy would carry imports the host must stub or refuse. A policy built for
//! `wasm32-unknown-unknown` imports exactly the contract's `host` interface and nothing else.

use crate::import_shim;
use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The target policies compile to.
pub const TARGET: &str = "wasm32-unknown-unknown";

/// Wrap a core module built with the SDK (it carries the component type in a custom section)
/// as a component, with the import shim folded into the policy module ([`import_shim`]).
pub fn componentize(core_module: &[u8]) -> anyhow::Result<Vec<u8>> {
    let component = wit_component::ComponentEncoder::default()
        .module(core_module)
        .context("the module does not carry a WIT component type: is it built with sandgate-policy-sdk?")?
        .validate(true)
        .encode()
        .context("the module cannot be wrapped as a component")?;
    // The fold is an optimisation: a component it does not recognise is used as encoded.
    match import_shim::fold(&component) {
        Ok(folded) => Ok(folded.unwrap_or(component)),
        Err(e) => {
            eprintln!("note: kept the component's import shim as encoded ({e:#}); each check costs ~0.5 µs more");
            Ok(component)
        }
    }
}

/// Whether rustup has the target installed, when rustup is what provides Rust here.
fn target_missing() -> bool {
    let Ok(out) = Command::new("rustup").args(["target", "list", "--installed"]).output() else {
        return false;
    };
    out.status.success() && !String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == TARGET)
}

/// Build the policy crate at `crate_dir` in release mode and return its component bytes and
/// the path of the core module it came from.
pub fn build_policy(crate_dir: &Path) -> anyhow::Result<(Vec<u8>, PathBuf)> {
    let manifest = crate_dir.join("Cargo.toml");
    if !manifest.is_file() {
        bail!("`{}` has no Cargo.toml: point `sandgate build` at a policy crate", crate_dir.display());
    }
    if target_missing() {
        bail!("the Rust target `{TARGET}` is not installed; install it with:\n    rustup target add {TARGET}");
    }
    let output = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "--release", "--lib", "--target", TARGET, "--message-format=json-render-diagnostics"])
        .arg("--manifest-path")
        .arg(&manifest)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run cargo")?;
    if !output.status.success() {
        bail!("cargo build failed for `{}` (errors above)", manifest.display());
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let wasm = stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| {
            msg["reason"] == "compiler-artifact"
                && msg["manifest_path"].as_str() == manifest.canonicalize().ok().as_deref().and_then(Path::to_str)
        })
        .flat_map(|msg| msg["filenames"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f.as_str().map(PathBuf::from))
        .find(|f| f.extension().is_some_and(|e| e == "wasm"));
    let Some(wasm) = wasm else {
        bail!(
            "`{}` built no .wasm library: a policy crate needs `[lib] crate-type = [\"cdylib\"]` and `sandgate_policy_sdk::export_policy!`",
            manifest.display()
        );
    };
    let core = std::fs::read(&wasm).with_context(|| format!("cannot read {}", wasm.display()))?;
    Ok((componentize(&core)?, wasm))
}
