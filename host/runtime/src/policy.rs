//! Loading a policy: validating a component against the contract and pre-instantiating it
//! once ([`PolicyModule`]), or saying exactly why it cannot be loaded ([`LoadError`]).

use crate::bindings::sandgate::policy::types::{CheckRequest, Decision};
use crate::bindings::v0_2::sandgate::policy::types::Decision as DecisionV0_2;
use crate::host_state::HostState;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use wasmtime::Store;
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{ComponentExportIndex, Func, InstancePre, TypedFunc};

/// A version of the WIT contract the host accepts policies built against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contract {
    /// `wit/0.1.0/policy.wit`: the whole request passed to `check` as one record.
    V0_1,
    /// `wit/policy.wit`: the request read on demand through the `request` interface.
    V0_2,
}

impl Contract {
    /// Every contract the host accepts, the current one first.
    pub const ALL: [Contract; 2] = [Contract::V0_2, Contract::V0_1];

    /// The version, e.g. `0.2.0`.
    pub fn version(self) -> &'static str {
        match self {
            Contract::V0_1 => "0.1.0",
            Contract::V0_2 => "0.2.0",
        }
    }

    /// The export a policy of this contract has.
    pub(crate) fn policy_export(self) -> &'static str {
        match self {
            Contract::V0_1 => "sandgate:policy/policy@0.1.0",
            Contract::V0_2 => "sandgate:policy/policy@0.2.0",
        }
    }

    /// The imports a policy of this contract may have besides WASI.
    pub(crate) fn allowed_imports(self) -> &'static [&'static str] {
        match self {
            Contract::V0_1 => &["sandgate:policy/types@0.1.0", "sandgate:policy/host@0.1.0"],
            Contract::V0_2 => {
                &["sandgate:policy/types@0.2.0", "sandgate:policy/request@0.2.0", "sandgate:policy/host@0.2.0"]
            }
        }
    }
}

/// The export of the current contract, named in errors.
pub(crate) const POLICY_EXPORT: &str = "sandgate:policy/policy@0.2.0";

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The bytes are not WebAssembly at all.
    #[error("not a WebAssembly file (it does not start with `\\0asm`)")]
    NotWasm,
    /// A core module, not a component.
    #[error(
        "this is a core WebAssembly module, not a component: build the policy with `sandgate build`, which wraps it as a `sandgate:policy/authorizer` component"
    )]
    CoreModule,
    /// The component failed to compile (malformed, truncated, unsupported features).
    #[error("the component is invalid: {0:#}")]
    Invalid(#[source] wasmtime::Error),
    /// The component imports something the host does not provide.
    #[error(
        "the policy imports `{0}`, which Sandgate does not provide: a policy may import the `sandgate:policy` interfaces of the contract version it exports and, built for wasm32-wasip2, WASI's cli, io, clocks, random and filesystem interfaces at 0.2 (linked deny-all), never sockets or HTTP"
    )]
    UnsupportedImport(String),
    /// The component does not export the policy interface.
    #[error(
        "the policy does not export `{POLICY_EXPORT}` (or 0.1.0's `sandgate:policy/policy@0.1.0`); it exports {0:?}: is it built against `wit/policy.wit`?"
    )]
    MissingExport(Vec<String>),
    /// Imports or exports have the right names but the wrong types.
    #[error("the policy does not match the WIT contract: {0:#}")]
    Contract(#[source] wasmtime::Error),
}

/// A policy compiled and pre-instantiated once, ready for any number of fresh instances.
#[derive(Clone)]
pub struct PolicyModule {
    pub(crate) pre: InstancePre<HostState>,
    /// The contract version it was built against.
    pub(crate) contract: Contract,
    /// The `check` export, type-checked against the contract's Rust types at load.
    pub(crate) check: ComponentExportIndex,
    pub(crate) digest: Arc<str>,
    pub(crate) size: usize,
    /// Whether it imports WASI (a `wasm32-wasip2` build): each check gets a deny-all context.
    pub(crate) wasi: bool,
    /// Evaluation threads this policy occupies now (its share is capped).
    pub(crate) load: crate::pool::PolicyLoad,
    /// The component's bytes, kept only when it is prepared (each snapshot is rewritten from
    /// them).
    pub(crate) bytes: Option<Arc<[u8]>>,
    /// Its preparations by data version, when it is prepared: it exports a `prepare` of the
    /// right type (checked at load) and imports no WASI (`crate::prepare`).
    pub(crate) preparations: Option<Arc<crate::prepare::Preparations>>,
}

impl PolicyModule {
    /// SHA-256 of the component bytes, lowercase hex.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Size of the component in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Whether the policy imports WASI (built for `wasm32-wasip2`).
    pub fn uses_wasi(&self) -> bool {
        self.wasi
    }

    /// The version of the WIT contract the policy was built against.
    pub fn contract(&self) -> Contract {
        self.contract
    }

    /// Whether the host prepares this policy for each data version (it exports `prepare` and
    /// imports no WASI).
    pub fn prepares(&self) -> bool {
        self.preparations.is_some()
    }

    pub(crate) fn preparable(&self) -> Option<&crate::prepare::Preparations> {
        self.preparations.as_deref()
    }
}

/// Function `name` of the exported instance `instance` (named `export` in errors), and its index.
fn function(
    pre: &InstancePre<HostState>,
    instance: &ComponentExportIndex,
    export: &str,
    name: &str,
) -> wasmtime::Result<(wasmtime::component::types::ComponentFunc, ComponentExportIndex)> {
    let (item, index) = pre
        .component()
        .get_export(Some(instance), name)
        .ok_or_else(|| wasmtime::format_err!("no `{name}` function in `{export}`"))?;
    match item {
        ComponentItem::ComponentFunc(func) => Ok((func, index)),
        _ => Err(wasmtime::format_err!("`{name}` is not a function")),
    }
}

/// The index of a 0.2.0 policy's `prepare` function, type-checked (`func() -> bool`), if it
/// exports one.
pub(crate) fn prepare_export(
    pre: &InstancePre<HostState>,
    contract: Contract,
) -> wasmtime::Result<Option<ComponentExportIndex>> {
    let export = crate::prepare::PREPARE_EXPORT;
    let Some((_, instance)) = pre.component().get_export(None, export).filter(|_| contract == Contract::V0_2) else {
        return Ok(None);
    };
    let (func, prepare) = function(pre, &instance, export, "prepare")?;
    wasmtime::error::Context::context(
        func.typecheck::<(), (bool,)>(&pre.instance_type()),
        "`prepare` has the wrong type",
    )?;
    Ok(Some(prepare))
}

/// The index of the `check` function in the `policy` export of `contract`, type-checked
/// against the Rust types `evaluate` calls it with.
pub(crate) fn check_export(pre: &InstancePre<HostState>, contract: Contract) -> wasmtime::Result<ComponentExportIndex> {
    let export = contract.policy_export();
    let (_, policy) =
        pre.component().get_export(None, export).ok_or_else(|| wasmtime::format_err!("no `{export}` export"))?;
    let (func, check) = function(pre, &policy, export, "check")?;
    let typed = match contract {
        Contract::V0_1 => func.typecheck::<(&CheckRequest,), (Decision,)>(&pre.instance_type()),
        Contract::V0_2 => func.typecheck::<(), (DecisionV0_2,)>(&pre.instance_type()),
    };
    wasmtime::error::Context::context(typed, "`check` has the wrong type")?;
    Ok(check)
}

/// Call the `check` export `func` of a policy of `contract` on `request`, without type-checking
/// it again: [`check_export`] type-checked it when the module was loaded, and a component's
/// types never change. (The generated bindings would check them on every instantiation: ~0.5
/// µs a check.) A 0.2.0 policy gets no argument: it reads the request the store holds.
pub(crate) fn call_check(
    store: &mut Store<HostState>,
    func: Func,
    contract: Contract,
    request: &CheckRequest,
) -> wasmtime::Result<Decision> {
    match contract {
        Contract::V0_1 => {
            // SAFETY: type-checked against these types at load (`check_export`).
            let check = unsafe { TypedFunc::<(&CheckRequest,), (Decision,)>::new_unchecked(func) };
            check.call(store, (request,)).map(|(decision,)| decision)
        }
        Contract::V0_2 => {
            // SAFETY: type-checked against these types at load (`check_export`).
            let check = unsafe { TypedFunc::<(), (DecisionV0_2,)>::new_unchecked(func) };
            check.call(store, ()).map(|(decision,)| crate::contract_v0_2::decision(decision))
        }
    }
}

/// SHA-256 of `bytes`, lowercase hex: how Sandgate names a policy module's version.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
