//! One instance reused for many checks: what Sandgate never does. It exists so the isolation
//! tests can show their check would catch state surviving between requests, and as the
//! benchmark's floor (the cost of a call without the cost of isolation). Compiled only with
//! the `bench-internals` feature, which the shipped binary does not enable.

use crate::bindings::sandgate::policy::types::{CheckRequest, Decision};
use crate::host_state::HostState;
use crate::policy::call_check;
use crate::{EvalContext, PolicyModule, Runtime};
use std::sync::Arc;
use wasmtime::Store;
use wasmtime::component::Func;

/// One instance reused for many checks: what Sandgate never does. It exists so the isolation
/// tests can show their check would catch state surviving between requests, and as the
/// benchmark's floor (the cost of a call without the cost of isolation). Not for production.
pub struct ReusedInstance {
    store: Store<HostState>,
    check: Func,
    contract: crate::Contract,
}

impl ReusedInstance {
    /// Instantiate `module` once.
    pub fn new(runtime: &Runtime, module: &PolicyModule, context: &EvalContext) -> anyhow::Result<Self> {
        let wasi = module.uses_wasi().then(|| crate::wasi::WasiState::new("reused", 0));
        // Replaced by each check's request before the call.
        let placeholder = crate::spec::from_spec(&Default::default(), 0, crate::spec::standalone_versions(""));
        let mut store = runtime.new_store(Arc::new(placeholder), context, wasi);
        let instance = module.pre.instantiate(&mut store).map_err(anyhow::Error::from)?;
        let check = instance.get_func(&mut store, module.check).ok_or_else(|| anyhow::anyhow!("no `check` export"))?;
        Ok(ReusedInstance { store, check, contract: module.contract })
    }

    /// Call `check` on the same instance again.
    pub fn check(&mut self, request: &Arc<CheckRequest>) -> anyhow::Result<Decision> {
        self.store.set_epoch_deadline(1_000);
        self.store.data_mut().request = request.clone();
        Ok(call_check(&mut self.store, self.check, self.contract, request)?)
    }
}
