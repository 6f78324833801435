//! Running a fixture file's cases against a compiled policy through the real runtime: the
//! same cases the SDK's native runner uses, so native and Wasm results can be compared.

use sandgate_runtime::{EvalContext, PolicyData, PolicyModule, Runtime, spec};
use sandgate_spec::{FixtureFile, Outcome};
use std::sync::Arc;

/// The result of one case.
#[derive(Debug)]
pub struct CaseResult {
    /// The case's name.
    pub name: String,
    /// What the policy answered.
    pub got: Outcome,
    /// `Err` with what differed from the expectation.
    pub verdict: Result<(), String>,
}

/// Evaluate every case of `file` with `module`, each in a fresh instance, at the file's `now`
/// or else at `now` (Unix seconds).
pub fn run(runtime: &Runtime, module: &PolicyModule, file: &FixtureFile, now: u64) -> Vec<CaseResult> {
    let now = file.now.unwrap_or(now);
    let file_data = Arc::new(PolicyData::new(file.data.clone().unwrap_or_default(), 1));
    file.cases
        .iter()
        .map(|case| {
            let data = match &case.data {
                Some(value) => Arc::new(PolicyData::new(value.clone(), 1)),
                None => file_data.clone(),
            };
            let check = Arc::new(spec::from_spec(&case.request, now, spec::standalone_versions(module.digest())));
            let evaluation = runtime.evaluate(module, &check, &EvalContext { data, verifier: None });
            let got = spec::outcome(&evaluation.decision);
            CaseResult { name: case.name.clone(), verdict: case.expect.check(&got), got }
        })
        .collect()
}
