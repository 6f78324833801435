//! One instance reused for many checks: what Sandgate never does. It exists so the isolation
//! tests can show their check would catch state surviving between requests, and as the
//! benchmark's floor (the cost of a call without the cost of isolation). Compiled only with
//! the `bench-internals` feature, which the shipped binary does not enable.

use crate::bindings::Authorizer;
use crate::bindings::sandgate::policy::types::{CheckRequest, Decision};
use crate::host_state::HostState;
use crate::{EvalContext, PolicyModule, Runtime};
use wasmtime::Store;

/// One instance reused for many checks: what Sandgate never does. It exists so the isolation
/// tests can show their check would catch state surviving between requests, and as the
/// benchmark's floor (the cost of a call without the cost of isolation). Not for production.
pub struct ReusedInstance {
    store: Store<HostState>,
    policy: Authorizer,
}

impl ReusedInstance {
    /// Instantiate `module` once.
    pub fn new(runtime: &Runtime, module: &PolicyModule, context: &EvalContext) -> anyhow::Result<Self> {
        let wasi = module.uses_wasi().then(|| crate::wasi::WasiState::new("reused", 0));
        let mut store = runtime.new_store(context, wasi);
        let policy = module.pre.instantiate(&mut store).map_err(anyhow::Error::from)?;
        Ok(ReusedInstance { store, policy })
    }

    /// Call `check` on the same instance again.
    pub fn check(&mut self, request: &CheckRequest) -> anyhow::Result<Decision> {
        self.store.set_epoch_deadline(1_000);
        self.policy.sandgate_policy_policy().call_check(&mut self.store, request).map_err(anyhow::Error::from)
    }
}
