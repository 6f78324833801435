//! Running a fixture file's cases against a compiled policy through the real runtime: the
//! same cases the SDK's native runner uses, so native and Wasm results can be compared.

use sandgate_runtime::{EvalContext, PolicyData, PolicyModule, Runtime, Start, spec};
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
/// or else at `now` (Unix seconds). A policy that prepares for its data (`prepare`) is run
/// both ways, as built and prepared, and a case fails if they answer differently: a sidecar
/// starts checks either way, depending on whether it has prepared the data version yet.
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
            let built = EvalContext { data, verifier: None, start: Start::Built };
            let got = spec::outcome(&runtime.evaluate(module, &check, &built).decision);
            let mut verdict = case.expect.check(&got);
            if verdict.is_ok() && module.prepares() {
                let prepared = EvalContext { start: Start::Prepared, ..built };
                let evaluation = runtime.evaluate(module, &check, &prepared);
                let again = spec::outcome(&evaluation.decision);
                if evaluation.prepared && again != got {
                    verdict = Err(format!("`prepare` changes the answer: {got:?} as built, {again:?} prepared"));
                }
            }
            CaseResult { name: case.name.clone(), verdict, got }
        })
        .collect()
}
