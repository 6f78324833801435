//! One instance reused for many checks: what Sandgate never does. It exists so the isolation
//! tests can show their check would catch state surviving between requests, and as the
//! benchmark's floor (the cost of a call without the cost of isolation). Compiled only with
//! the `bench-internals` feature, which the shipped binary does not enable.

use crate::bindings::sandgate::policy::types::{CheckRequest, Decision};
use crate::bindings::v0_2::sandgate::policy::types::Decision as DecisionV0_2;
use crate::host_state::HostState;
use crate::{Contract, EvalContext, PolicyModule, Runtime};
use std::sync::Arc;
use wasmtime::Store;
use wasmtime::component::{Func, TypedFunc};

/// One instance reused for many checks: what Sandgate never does. It exists so the isolation
/// tests can show their check would catch state surviving between requests, and as the
/// benchmark's floor (the cost of a call without the cost of isolation). Not for production.
pub struct ReusedInstance {
    store: Store<HostState>,
    check: Func,
    contract: Contract,
}

impl ReusedInstance {
    /// Instantiate `module` once.
    pub fn new(runtime: &Runtime, module: &PolicyModule, context: &EvalContext) -> anyhow::Result<Self> {
        let wasi = module.uses_wasi().then(|| crate::wasi::WasiState::new("reused", 0));
        let versions = crate::bindings::sandgate::policy::types::SnapshotVersions {
            snapshot: 0,
            policy_digest: String::new(),
            key_set: 0,
            revocations: 0,
            data: 0,
        };
        let request = Arc::new(crate::spec::from_spec(&Default::default(), 0, versions));
        let mut store = runtime.new_store(request, context, wasi);
        let instance = module.pre.instantiate(&mut store).map_err(anyhow::Error::from)?;
        let check = instance.get_func(&mut store, module.check).ok_or_else(|| anyhow::anyhow!("no `check` export"))?;
        Ok(ReusedInstance { store, check, contract: module.contract })
    }

    /// Call `check` on the same instance again.
    pub fn check(&mut self, request: &Arc<CheckRequest>) -> anyhow::Result<Decision> {
        self.store.set_epoch_deadline(1_000);
        self.store.data_mut().request = request.clone();
        let decision = match self.contract {
            Contract::V0_1 => {
                // SAFETY: `check_export` type-checked the export against these types at load.
                let check = unsafe { TypedFunc::<(&CheckRequest,), (Decision,)>::new_unchecked(self.check) };
                check.call(&mut self.store, (&**request,))?.0
            }
            Contract::V0_2 => {
                // SAFETY: `check_export` type-checked the export against these types at load.
                let check = unsafe { TypedFunc::<(), (DecisionV0_2,)>::new_unchecked(self.check) };
                crate::contract_v0_2::decision(check.call(&mut self.store, ())?.0)
            }
        };
        Ok(decision)
    }
}
