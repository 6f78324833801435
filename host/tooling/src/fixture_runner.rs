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
/// or else at `now` (Unix seconds). A case of a policy that prepares for its data (`prepare`)
/// that passes as built runs prepared too, and fails if the answers differ in anything: a
/// sidecar starts checks either way, depending on whether it has prepared the data version
/// yet. (If the policy declines to prepare for the case's data, or cannot, there is nothing to
/// compare.)
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
            let as_built = runtime.evaluate(module, &check, &built);
            let got = spec::outcome(&as_built.decision);
            let mut verdict = case.expect.check(&got);
            if verdict.is_ok() && module.prepares() {
                let prepared = EvalContext { start: Start::Prepared, ..built };
                let evaluation = runtime.evaluate(module, &check, &prepared);
                // The whole answer (headers removed, a denial's headers and message too), and
                // any fault.
                let same = evaluation.decision == as_built.decision && evaluation.fault == as_built.fault;
                if evaluation.prepared && !same {
                    verdict = Err(format!(
                        "`prepare` changes the answer: {:?} as built, {:?} prepared",
                        as_built.decision, evaluation.decision
                    ));
                }
            }
            CaseResult { name: case.name.clone(), verdict, got }
        })
        .collect()
}
