//! `sandgate new`: a policy crate that builds, tests and passes its fixtures out of the box.

use anyhow::{Context, bail};
use std::path::Path;

/// The SDK version a new policy depends on: the one released with this binary.
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Write a new policy crate `name` into `dir` (which must not exist or be empty). It depends
/// on `sandgate-policy-sdk` from crates.io at [`SDK_VERSION`], or, with `sdk`, on the SDK crate
/// at that path.
pub fn new_policy(name: &str, dir: &Path, sdk: Option<&Path>) -> anyhow::Result<()> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid {
        bail!(
            "`{name}` is not a valid policy name: use lowercase letters, digits, `-` and `_`, starting with a letter"
        );
    }
    if dir.exists() && dir.read_dir().map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("`{}` already exists and is not empty: choose another name or --path", dir.display());
    }
    let dependency = match sdk {
        None => format!("{SDK_VERSION:?}"),
        Some(sdk) => {
            let sdk = sdk.canonicalize().with_context(|| {
                format!("the policy SDK is not at `{}`; pass --sdk PATH/TO/guest-policies/sdk", sdk.display())
            })?;
            if !sdk.join("Cargo.toml").is_file() {
                bail!("`{}` is not a crate: pass --sdk PATH/TO/guest-policies/sdk", sdk.display());
            }
            format!("{{ path = {:?} }}", sdk.display().to_string())
        }
    };
    let files = [
        ("Cargo.toml", cargo_toml(name, &dependency)),
        ("src/lib.rs", LIB_RS.replace("{struct}", &struct_name(name))),
        ("fixtures.json", FIXTURES.to_owned()),
        (".gitignore", "/target\n".to_owned()),
    ];
    for (file, text) in files {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create `{}`", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write `{}`", path.display()))?;
    }
    Ok(())
}

fn struct_name(name: &str) -> String {
    name.split(['-', '_'])
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map(|c| c.to_ascii_uppercase().to_string() + chars.as_str()).unwrap_or_default()
        })
        .collect()
}

fn cargo_toml(name: &str, dependency: &str) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
# cdylib: the Wasm component `sandgate build` makes; rlib: native `cargo test`.
crate-type = ["cdylib", "rlib"]

[dependencies]
sandgate-policy-sdk = {dependency}

# A policy is its own workspace, so it builds wherever it lives.
[workspace]

[profile.release]
opt-level = 3
lto = true
codegen-units = 1
panic = "abort"
"#,
    )
}

const LIB_RS: &str = r#"//! A Sandgate policy. Edit `check`, add cases to `fixtures.json`, then:
//!
//! - `cargo test`: run the fixtures natively (host calls served by the SDK's stand-in);
//! - `sandgate build`: compile to a validated Wasm component;
//! - `sandgate test`: run the fixtures against that component in the real runtime.

use sandgate_policy_sdk::{allow, deny, Decision, DecisionExt, Policy, Request};

/// Readers may read; writers may also change things. Everyone else is turned away.
pub struct {struct};

impl Policy for {struct} {
    fn check(request: &Request) -> Decision {
        // No token, or one the host rejected: 401 with the host's reason.
        if let Some(denial) = request.unauthenticated() {
            return denial;
        }
        let reading = matches!(request.method(), "GET" | "HEAD");
        let permitted = request.has_role("writer") || (reading && request.has_role("reader"));
        if !permitted {
            return deny(403, "forbidden").message("your roles do not permit this");
        }
        let subject = request.subject().unwrap_or_default();
        allow().set_header("x-user", subject)
    }
}

sandgate_policy_sdk::export_policy!({struct});

#[cfg(test)]
mod tests {
    #[test]
    fn fixtures() {
        sandgate_policy_sdk::testing::run_fixtures::<super::{struct}>(include_str!("../fixtures.json"));
    }
}
"#;

const FIXTURES: &str = r#"{
  "now": 1767225600,
  "cases": [
    { "name": "a reader may read",
      "request": { "method": "GET", "path": "/documents/1", "claims": { "sub": "alice", "roles": ["reader"] } },
      "expect": { "decision": "allow", "headers": { "x-user": "alice" } } },
    { "name": "a reader may not write",
      "request": { "method": "POST", "path": "/documents", "claims": { "sub": "alice", "roles": ["reader"] } },
      "expect": { "decision": "deny", "status": 403, "reason": "forbidden" } },
    { "name": "a writer may write",
      "request": { "method": "POST", "path": "/documents", "claims": { "sub": "bob", "roles": ["writer"] } },
      "expect": { "decision": "allow", "headers": { "x-user": "bob" } } },
    { "name": "no token is 401",
      "request": { "path": "/documents/1" },
      "expect": { "decision": "deny", "status": 401, "reason": "missing_credential" } }
  ]
}
"#;
