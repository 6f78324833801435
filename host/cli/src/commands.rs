//! One module per subcommand, and what several of them share.

pub mod bench;
pub mod build;
pub mod eval;
pub mod fleet;
pub mod new;
pub mod pull;
pub mod push;
mod registry;
pub mod replay;
pub mod serve;
pub mod test;

use anyhow::Context;
use sandgate_runtime::bindings::sandgate::policy::types::CheckRequest;
use sandgate_runtime::{EvalContext, PolicyData, PolicyModule, Runtime, RuntimeConfig, Start};
use sandgate_spec::RequestSpec;
use std::path::Path;
use std::sync::Arc;

/// A password for `flag` (`--user`, `--username`): the first line of standard input with
/// `--password-stdin`, else the environment variable `env`.
fn password(from_stdin: bool, env: &str, flag: &str) -> anyhow::Result<String> {
    use anyhow::Context;
    use std::io::BufRead;
    if from_stdin {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).context("cannot read the password from stdin")?;
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    } else {
        std::env::var(env).with_context(|| format!("{flag} needs --password-stdin or {env}"))
    }
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {what} `{}`", path.display()))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> anyhow::Result<T> {
    serde_json::from_slice(&read(path, what)?).with_context(|| format!("{what} `{}` is not valid", path.display()))
}

/// A runtime for one command-line evaluation at a time.
fn small_runtime() -> anyhow::Result<Runtime> {
    Runtime::new(RuntimeConfig { max_instances: 1, ..Default::default() })
}

fn load(runtime: &Runtime, path: &Path) -> anyhow::Result<PolicyModule> {
    runtime.load(&read(path, "policy")?).with_context(|| format!("cannot load policy `{}`", path.display()))
}

/// Load a freshly built component, which must pass the runtime's validation.
fn load_built(runtime: &Runtime, component: &[u8]) -> anyhow::Result<PolicyModule> {
    runtime.load(component).context("the built component does not pass validation")
}

/// A runtime, the loaded policy, the check request from its JSON file, and the data document:
/// what `eval` and `bench` start from.
fn prepare(
    policy: &Path,
    request_path: &Path,
    data: Option<&Path>,
) -> anyhow::Result<(Runtime, PolicyModule, Arc<CheckRequest>, EvalContext)> {
    let spec: RequestSpec = read_json(request_path, "request")?;
    let value = match data {
        Some(path) => read_json(path, "data document")?,
        None => serde_json::Value::Null,
    };
    let runtime = small_runtime()?;
    let module = load(&runtime, policy)?;
    let versions = sandgate_runtime::spec::standalone_versions(module.digest());
    let check = Arc::new(sandgate_runtime::spec::from_spec(&spec, sandgate_server::unix_now(), versions));
    // As a sidecar's checks start once it has prepared the data version.
    let context = EvalContext { data: Arc::new(PolicyData::new(value, 1)), verifier: None, start: Start::Prepared };
    Ok((runtime, module, check, context))
}
