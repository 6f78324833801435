//! Turning a policy crate into a component, for one of two targets:
//!
//! - `wasm32-unknown-unknown` (the default): `cargo build`, then wrap the core module as a
//!   component of the `sandgate:policy/authorizer` world. The policy imports exactly the
//!   contract's `host` interface; a check costs the least.
//! - `wasm32-wasip2`: the standard toolchain builds the component itself. Its standard library
//!   imports WASI (`wasi:cli`, `wasi:io`, `wasi:clocks`, `wasi:random`), which the host links
//!   deny-all and deterministic; `println!`, `std::time` and `HashMap` work as in any program.

use crate::import_shim;
use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What a policy crate is compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Target {
    /// `wasm32-unknown-unknown`, wrapped as a component by Sandgate: no WASI at all.
    #[default]
    Unknown,
    /// `wasm32-wasip2`: a component from the standard toolchain, importing the deny-all WASI.
    Wasip2,
}

impl Target {
    /// The Rust target triple.
    pub fn triple(self) -> &'static str {
        match self {
            Target::Unknown => "wasm32-unknown-unknown",
            Target::Wasip2 => "wasm32-wasip2",
        }
    }
}

impl std::str::FromStr for Target {
    type Err = String;

    fn from_str(triple: &str) -> Result<Self, String> {
        let targets = [Target::Unknown, Target::Wasip2];
        targets.into_iter().find(|t| t.triple() == triple).ok_or_else(|| {
            format!("unsupported target `{triple}`: use `{}` or `{}`", targets[0].triple(), targets[1].triple())
        })
    }
}

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

/// Bytes of initial heap a policy is linked with (a multiple of the 64 KiB page).
const INITIAL_HEAP: usize = 256 << 10;

/// Whether rustup has the target installed, when rustup is what provides Rust here.
fn target_missing(target: &str) -> bool {
    let Ok(out) = Command::new("rustup").args(["target", "list", "--installed"]).output() else {
        return false;
    };
    out.status.success() && !String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == target)
}

/// Build the policy crate at `crate_dir` in release mode for `target` and return its component
/// bytes and the path of cargo's artifact.
pub fn build_policy(crate_dir: &Path, target: Target) -> anyhow::Result<(Vec<u8>, PathBuf)> {
    let triple = target.triple();
    let manifest = crate_dir.join("Cargo.toml");
    if !manifest.is_file() {
        bail!("`{}` has no Cargo.toml: point `sandgate build` at a policy crate", crate_dir.display());
    }
    if target_missing(triple) {
        bail!("the Rust target `{triple}` is not installed; install it with:\n    rustup target add {triple}");
    }
    // `cargo rustc`: the link argument goes to the policy crate alone. A 256 KiB initial heap
    // past all static data, which the SDK's allocator takes before growing memory (see its
    // `bump_allocator`): a memory image prepared by `prepare` then ends just past what it
    // built.
    let output = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["rustc", "--release", "--lib", "--target", triple, "--message-format=json-render-diagnostics"])
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["--", "-C", &format!("link-arg=--initial-heap={INITIAL_HEAP}")])
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
    let bytes = std::fs::read(&wasm).with_context(|| format!("cannot read {}", wasm.display()))?;
    match target {
        Target::Unknown => Ok((componentize(&bytes)?, wasm)),
        // The toolchain's linker (`wasm-component-ld`) already made a component.
        Target::Wasip2 => Ok((bytes, wasm)),
    }
}
