//! The policy runtime: compiles policy components once and evaluates each check in a fresh
//! instance.
//!
//! Object lifetimes, as in wasmtime's own guidance:
//! - one [`Runtime`] (one `Engine`, one `Linker`, one epoch ticker) per process;
//! - one [`PolicyModule`] per policy version: the component compiled once and pre-instantiated
//!   (`InstancePre`: imports resolved, type-checked) once;
//! - one `Store` and one instance per check, dropped when the check ends.
//!
//! **Why a store is never reused.** A policy is ordinary code with ordinary globals. Reusing an
//! instance would let a `static`, a cache or a thread-local written during one request be read
//! by the next: exactly the cross-request leaks (a "current user" left behind, a half-updated
//! cache) that Sandgate exists to rule out. And after a trap or an epoch interrupt an instance
//! may be stopped mid-update, with a guest lock held or an allocator half-way through a change;
//! no later request may run on it. A fresh instance from the pooling allocator costs a few
//! microseconds (see `docs/BENCHMARKS.md`), so isolation is not traded for speed.

use crate::bindings::sandgate::policy::types::{CheckRequest, Decision, DenyResponse, Header};
use crate::bindings::{Authorizer, AuthorizerPre};
use crate::host_calls::{HostState, PolicyData, PolicyLog, TokenVerifier};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, ComponentExportIndex, InstancePre, Linker, TypedFunc};
use wasmtime::{
    Config, Engine, Enabled, InstanceAllocationStrategy, OptLevel, PoolingAllocationConfig, Store, Trap,
};

/// The imports a policy may have: the WIT contract's `types` and `host` interfaces.
const ALLOWED_IMPORTS: [&str; 2] = ["sandgate:policy/types@0.1.0", "sandgate:policy/host@0.1.0"];
/// The export a policy must have.
const POLICY_EXPORT: &str = "sandgate:policy/policy@0.1.0";

/// Limits of the runtime. The defaults suit a sidecar on a small machine.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Policy instances alive at once (the pool's size); checks beyond this wait in a queue.
    pub max_instances: u32,
    /// Wall-clock budget for one check's policy call.
    pub timeout: Duration,
    /// Linear memory one instance may use, in bytes.
    pub memory_limit: usize,
    /// How long a check may wait for a free instance before it is denied as overloaded.
    pub queue_timeout: Duration,
    /// Reset every page of an instance's memory after a check, not only the pages found written
    /// (slower: see [`Runtime::new`]). Chosen automatically when the host has swap enabled.
    pub full_memory_reset: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_instances: 64,
            timeout: Duration::from_millis(100),
            memory_limit: 16 << 20,
            queue_timeout: Duration::from_secs(1),
            full_memory_reset: false,
        }
    }
}

/// How often the epoch advances; the timeout is rounded up to whole ticks.
/// Each tick wakes a thread on a busy machine; 5 ms keeps that cost negligible while a 100 ms
/// budget is still enforced within 5%.
const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Guest memory kept resident between instances in a pool slot: resetting it is one `memset`
/// or page-map scan instead of `madvise` + page faults (DESIGN.md measured 21.8 µs → 8.6 µs).
const KEEP_RESIDENT: usize = 4 << 20;
/// Memory reset in place on a full reset (the rest is decommitted): the fastest of those
/// measured without the page scan (docs/BENCHMARKS.md).
const FULL_RESET_KEEP_RESIDENT: usize = 128 << 10;

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
    #[error("the policy imports `{0}`, which Sandgate does not provide; policies may import only {ALLOWED_IMPORTS:?}")]
    UnsupportedImport(String),
    /// The component does not export the policy interface.
    #[error("the policy does not export `{POLICY_EXPORT}` (it exports {0:?}); is it built against `wit/policy.wit`?")]
    MissingExport(Vec<String>),
    /// Imports or exports have the right names but the wrong types.
    #[error("the policy does not match the WIT contract: {0:#}")]
    Contract(#[source] wasmtime::Error),
}

/// A policy compiled and pre-instantiated once, ready for any number of fresh instances.
#[derive(Clone)]
pub struct PolicyModule {
    pre: AuthorizerPre<HostState>,
    /// The `check` export, type-checked against the contract's Rust types at load.
    check: ComponentExportIndex,
    digest: Arc<str>,
    size: usize,
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
}

/// Why the host, not the policy, decided a check: every one is a deny.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyFault {
    /// The policy ran past its time budget.
    #[error("the policy ran past its time limit")]
    Timeout,
    /// The policy tried to grow memory past its limit.
    #[error("the policy ran out of memory")]
    OutOfMemory,
    /// The policy recursed too deep.
    #[error("the policy overflowed its stack")]
    StackOverflow,
    /// The policy panicked or aborted.
    #[error("the policy panicked")]
    Panicked,
    /// Any other trap.
    #[error("the policy trapped: {0}")]
    Trap(String),
    /// The decision was larger than the host accepts.
    #[error("the policy's decision is too large: {0}")]
    DecisionTooLarge(String),
    /// The decision broke the contract (e.g. a deny with status 200, a bad header).
    #[error("the policy's decision is malformed: {0}")]
    MalformedDecision(String),
    /// No instance was free within the queue timeout.
    #[error("no policy instance was free in time")]
    Overloaded,
    /// The host failed to create the instance.
    #[error("the policy could not be instantiated: {0}")]
    Instantiate(String),
}

impl PolicyFault {
    /// The reason code written in the deny and the decision log.
    pub fn reason(&self) -> &'static str {
        match self {
            PolicyFault::Timeout => "policy_timeout",
            PolicyFault::OutOfMemory => "policy_out_of_memory",
            PolicyFault::StackOverflow => "policy_stack_overflow",
            PolicyFault::Panicked => "policy_panicked",
            PolicyFault::Trap(_) => "policy_trap",
            PolicyFault::DecisionTooLarge(_) => "policy_decision_too_large",
            PolicyFault::MalformedDecision(_) => "policy_malformed_decision",
            PolicyFault::Overloaded => "overloaded",
            PolicyFault::Instantiate(_) => "policy_instantiation_failed",
        }
    }

    /// The status of the deny: 503 when overloaded (retryable), else 403.
    pub fn status(&self) -> u16 {
        match self {
            PolicyFault::Overloaded => 503,
            _ => 403,
        }
    }
}

/// The result of one evaluation.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// The decision to answer. A fault is always a deny.
    pub decision: Decision,
    /// Set when the host decided (a deny) because the policy failed.
    pub fault: Option<PolicyFault>,
    /// Lines the policy logged, for the decision log.
    pub logs: Vec<PolicyLog>,
    /// How often the guest grew its memory past the initial size (each costs `mprotect`
    /// calls in the host); 0 for a well-behaved policy.
    pub memory_grows: u32,
    /// Whether the check had to wait for a free instance.
    pub queued: bool,
}

impl Evaluation {
    fn fault(fault: PolicyFault, logs: Vec<PolicyLog>, memory_grows: u32) -> Self {
        let decision = Decision::Deny(DenyResponse {
            status: fault.status(),
            reason: fault.reason().to_owned(),
            message: "access denied".to_owned(),
            headers: Vec::new(),
        });
        Evaluation { decision, fault: Some(fault), logs, memory_grows, queued: false }
    }

    /// Whether the request is allowed.
    pub fn is_allow(&self) -> bool {
        matches!(self.decision, Decision::Allow(_))
    }

    /// The reason code: the policy's for a deny, `allow` for an allow.
    pub fn reason(&self) -> &str {
        match &self.decision {
            Decision::Allow(_) => "allow",
            Decision::Deny(d) => &d.reason,
        }
    }
}

/// What a check may consult besides its request: the pinned snapshot's pieces.
#[derive(Clone, Default)]
pub struct EvalContext {
    /// The policy's read-only data document.
    pub data: Arc<PolicyData>,
    /// Verifies tokens for the `verify-jwt` import; `None` answers `verification_unavailable`.
    pub verifier: Option<Arc<dyn TokenVerifier>>,
}

/// The policy runtime. See the module documentation for lifetimes and guarantees.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    config: RuntimeConfig,
    permits: Arc<tokio::sync::Semaphore>,
    ticker_stop: Arc<AtomicBool>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

impl Runtime {
    /// Create the engine, the pooling allocator and the epoch ticker.
    ///
    /// After each check wasmtime resets the instance's memory slot to the module's initial image.
    /// By default it asks Linux which pages the check wrote (`PAGEMAP_SCAN`) and resets only
    /// those. That scan only sees pages in memory: a written page the kernel has swapped out
    /// would be neither reset nor dropped, and the next check in that slot would read the last
    /// one's data (wasmtime PR #14357, open). So when swap is on (`/proc/swaps` lists a device
    /// and the cgroup's `memory.swap.max` is not 0), or `full_memory_reset` is set, the scan is
    /// off and every page of the memory is reset: the first 128 KiB in place, the rest
    /// decommitted, which also drops swapped pages. That more than doubles the cost of a check
    /// (docs/BENCHMARKS.md). Swap turned on after start is not seen: set `full_memory_reset`
    /// where that can happen.
    pub fn new(mut config: RuntimeConfig) -> anyhow::Result<Self> {
        anyhow::ensure!(config.max_instances > 0, "max_instances must be at least 1");
        anyhow::ensure!(config.memory_limit >= 1 << 20, "memory_limit must be at least 1 MiB");
        let read = |path| std::fs::read_to_string(path).ok();
        if !config.full_memory_reset && swap_possible(read("/proc/swaps").as_deref(), read("/sys/fs/cgroup/memory.swap.max").as_deref()) {
            tracing::warn!("swap is enabled: resetting all of each policy instance's memory after every check (slower), since the written-page scan cannot see swapped-out pages");
            config.full_memory_reset = true;
        }
        let (keep_resident, scan) = match config.full_memory_reset {
            false => (KEEP_RESIDENT, Enabled::Auto),
            true => (FULL_RESET_KEEP_RESIDENT, Enabled::No),
        };
        let instances = config.max_instances;
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(instances)
            // A policy component holds its own module plus the small shim modules the
            // component model uses for imports returning strings or lists.
            .total_core_instances(instances * 4)
            .total_memories(instances)
            .total_tables(instances * 4)
            .max_memories_per_component(1)
            // A policy module has its function table and, after `sandgate build` folds the import
            // shim into it (`import_shim`), the table of its host imports.
            .max_tables_per_module(2)
            .max_memory_size(config.memory_limit)
            .linear_memory_keep_resident(keep_resident.min(config.memory_limit))
            .table_keep_resident(64 << 10)
            .pagemap_scan(scan);

        let mut wasm = Config::new();
        wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .epoch_interruption(true)
            .cranelift_opt_level(OptLevel::Speed)
            // Policies are compiled while the sidecar serves (hot-loading). One compiler
            // thread leaves the other cores to checks: on 2 cores, parallel compilation
            // doubled the p99 of checks during continuous reloads.
            .parallel_compilation(false);
        let engine = Engine::new(&wasm).map_err(anyhow::Error::from)?;

        let mut linker = Linker::new(&engine);
        Authorizer::add_to_linker::<HostState, wasmtime::component::HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(anyhow::Error::from)?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let (ticker_engine, stop) = (engine.clone(), ticker_stop.clone());
        std::thread::Builder::new().name("sandgate-epoch".into()).spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                ticker_engine.increment_epoch();
            }
        })?;

        Ok(Runtime {
            engine,
            linker,
            permits: Arc::new(tokio::sync::Semaphore::new(instances as usize)),
            config,
            ticker_stop,
        })
    }

    /// Instances in use by [`Runtime::check`] right now.
    pub fn instances_in_use(&self) -> usize {
        self.config.max_instances as usize - self.permits.available_permits()
    }

    /// Compile and validate a policy component: only the contract's imports, the `policy`
    /// export with the contract's types. Compilation is slow (milliseconds): do it once per
    /// policy version, off the request path.
    pub fn load(&self, bytes: &[u8]) -> Result<PolicyModule, LoadError> {
        match bytes.get(..8) {
            Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => return Err(LoadError::CoreModule),
            Some([0, b'a', b's', b'm', ..]) => {}
            _ => return Err(LoadError::NotWasm),
        }
        let component = Component::new(&self.engine, bytes).map_err(LoadError::Invalid)?;
        let ty = component.component_type();
        if let Some((name, _)) = ty.imports(&self.engine).find(|(name, _)| !ALLOWED_IMPORTS.contains(name)) {
            return Err(LoadError::UnsupportedImport(name.to_owned()));
        }
        let exports: Vec<String> = ty.exports(&self.engine).map(|(name, _)| name.to_owned()).collect();
        if !exports.iter().any(|e| e == POLICY_EXPORT) {
            return Err(LoadError::MissingExport(exports));
        }
        let instance_pre = self.linker.instantiate_pre(&component).map_err(LoadError::Contract)?;
        let check = check_export(&instance_pre).map_err(LoadError::Contract)?;
        let pre = AuthorizerPre::new(instance_pre).map_err(LoadError::Contract)?;
        Ok(PolicyModule { pre, check, digest: sha256_hex(bytes).into(), size: bytes.len() })
    }

    /// The path of the probe check every policy must answer, within its limits, before it is
    /// published. Any decision will do; a trap or a timeout is a rejection.
    pub const PROBE_PATH: &str = "/.sandgate/probe";

    /// Run the probe check: a `GET` of [`Runtime::PROBE_PATH`] without credential or data.
    pub fn probe(&self, module: &PolicyModule) -> Result<(), PolicyFault> {
        use crate::bindings::sandgate::policy::types::{Credential, SnapshotVersions};
        let request = CheckRequest {
            request_id: "probe".into(),
            method: "GET".into(),
            scheme: "http".into(),
            host: "localhost".into(),
            path: Self::PROBE_PATH.into(),
            query: None,
            headers: Vec::new(),
            peer: None,
            body: None,
            credential: Credential::None,
            now: crate::request::unix_now(),
            versions: SnapshotVersions { snapshot: 0, policy_digest: module.digest().into(), key_set: 0, revocations: 0, data: 0 },
        };
        // The probe takes a pool slot like any check, waiting up to the queue timeout.
        let deadline = std::time::Instant::now() + self.config.queue_timeout;
        let _permit = loop {
            match self.permits.try_acquire() {
                Ok(permit) => break permit,
                Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
                Err(_) => return Err(PolicyFault::Overloaded),
            }
        };
        match self.evaluate(module, &request, &EvalContext::default()).fault {
            Some(fault) => Err(fault),
            None => Ok(()),
        }
    }

    /// Evaluate one check in a fresh instance, waiting up to the queue timeout for a free
    /// slot in the pool. Runs the (bounded) policy call on the current thread.
    pub async fn check(&self, module: &PolicyModule, request: &CheckRequest, context: &EvalContext) -> Evaluation {
        if let Ok(_permit) = self.permits.try_acquire() {
            return self.evaluate(module, request, context);
        }
        let permit = tokio::time::timeout(self.config.queue_timeout, self.permits.acquire()).await;
        let mut evaluation = match permit {
            Ok(Ok(_permit)) => self.evaluate(module, request, context),
            _ => Evaluation::fault(PolicyFault::Overloaded, Vec::new(), 0),
        };
        evaluation.queued = true;
        evaluation
    }

    /// Evaluate one check only if an instance is free right now (shadow evaluations, which
    /// must never make a live check wait).
    pub fn try_check(&self, module: &PolicyModule, request: &CheckRequest, context: &EvalContext) -> Option<Evaluation> {
        let _permit = self.permits.try_acquire().ok()?;
        Some(self.evaluate(module, request, context))
    }

    /// Evaluate one check in a fresh instance: new store, instantiate, call, drop. If the pool
    /// is full the check is denied as overloaded; [`Runtime::check`] queues instead.
    pub fn evaluate(&self, module: &PolicyModule, request: &CheckRequest, context: &EvalContext) -> Evaluation {
        let mut store = self.new_store(context);
        let result = module
            .pre
            .instance_pre()
            .instantiate(&mut store)
            .map_err(|e| classify_instantiation(&e, &store))
            .and_then(|instance| {
                let func = instance.get_func(&mut store, module.check).ok_or(PolicyFault::Trap("the `check` export is missing".into()))?;
                // SAFETY: `check_export` type-checked this export against these types when the
                // module was loaded, and a component's types never change. (The generated
                // bindings would check them again on every instantiation: ~0.5 µs a check.)
                let check = unsafe { TypedFunc::<(&CheckRequest,), (Decision,)>::new_unchecked(func) };
                check.call(&mut store, (request,)).map(|(decision,)| decision).map_err(|e| classify_trap(&e, &store))
            });
        let logs = std::mem::take(&mut store.data_mut().logs);
        let memory_grows = store.data().limiter.grows;
        match result.and_then(validate_decision) {
            Ok(decision) => Evaluation { decision, fault: None, logs, memory_grows, queued: false },
            Err(fault) => Evaluation::fault(fault, logs, memory_grows),
        }
    }

    fn new_store(&self, context: &EvalContext) -> Store<HostState> {
        let state = HostState::new(context.data.clone(), context.verifier.clone(), self.config.memory_limit);
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        let ticks = self.config.timeout.as_micros().div_ceil(EPOCH_TICK.as_micros()) as u64 + 1;
        store.set_epoch_deadline(ticks);
        store
    }
}

/// One instance reused for many checks: what Sandgate never does. It exists so the isolation
/// tests can show their check would catch state surviving between requests, and as the
/// benchmark's floor (the cost of a call without the cost of isolation). Not for production.
#[doc(hidden)]
pub struct ReusedInstance {
    store: Store<HostState>,
    policy: Authorizer,
}

impl ReusedInstance {
    /// Instantiate `module` once.
    pub fn new(runtime: &Runtime, module: &PolicyModule, context: &EvalContext) -> anyhow::Result<Self> {
        let mut store = runtime.new_store(context);
        let policy = module.pre.instantiate(&mut store).map_err(anyhow::Error::from)?;
        Ok(ReusedInstance { store, policy })
    }

    /// Call `check` on the same instance again.
    pub fn check(&mut self, request: &CheckRequest) -> anyhow::Result<Decision> {
        self.store.set_epoch_deadline(1_000);
        self.policy.sandgate_policy_policy().call_check(&mut self.store, request).map_err(anyhow::Error::from)
    }
}

/// The index of the `check` function in the `policy` export, type-checked against the Rust
/// types `evaluate` calls it with.
fn check_export(pre: &InstancePre<HostState>) -> wasmtime::Result<ComponentExportIndex> {
    let component = pre.component();
    let (_, policy) = component.get_export(None, POLICY_EXPORT).ok_or_else(|| wasmtime::format_err!("no `{POLICY_EXPORT}` export"))?;
    let (item, check) = component.get_export(Some(&policy), "check").ok_or_else(|| wasmtime::format_err!("no `check` function in `{POLICY_EXPORT}`"))?;
    let ComponentItem::ComponentFunc(func) = item else { return Err(wasmtime::format_err!("`check` is not a function")) };
    wasmtime::error::Context::context(func.typecheck::<(&CheckRequest,), (Decision,)>(&pre.instance_type()), "`check` has the wrong type")?;
    Ok(check)
}

/// Whether this process's memory may be swapped out: `/proc/swaps` (its text, if readable)
/// lists a swap device or file, and the cgroup's `memory.swap.max` (cgroup v2, if readable) is
/// not `0` (a container can be denied swap on a host that has it).
fn swap_possible(proc_swaps: Option<&str>, cgroup_swap_max: Option<&str>) -> bool {
    let host_has_swap = proc_swaps.is_some_and(|text| text.lines().skip(1).any(|line| !line.trim().is_empty()));
    host_has_swap && cgroup_swap_max.is_none_or(|max| max.trim() != "0")
}

/// SHA-256 of `bytes`, lowercase hex: how Sandgate names a policy module's version.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn classify_instantiation(error: &wasmtime::Error, store: &Store<HostState>) -> PolicyFault {
    if store.data().limiter.exceeded() {
        return PolicyFault::OutOfMemory;
    }
    let text = format!("{error:#}");
    // The pooling allocator refuses a new instance when every slot is taken.
    if text.contains("maximum concurrent") {
        return PolicyFault::Overloaded;
    }
    // A start function or initialiser may also trap.
    match error.downcast_ref::<Trap>() {
        Some(_) => classify_trap(error, store),
        None => PolicyFault::Instantiate(text),
    }
}

fn classify_trap(error: &wasmtime::Error, store: &Store<HostState>) -> PolicyFault {
    if store.data().limiter.exceeded() {
        // Growth was refused; the guest's allocator failed and it aborted.
        return PolicyFault::OutOfMemory;
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => PolicyFault::Timeout,
        Some(Trap::StackOverflow) => PolicyFault::StackOverflow,
        Some(Trap::UnreachableCodeReached) => PolicyFault::Panicked,
        Some(trap) => PolicyFault::Trap(trap.to_string()),
        None => PolicyFault::Trap(format!("{error:#}")),
    }
}

/// Bounds on a decision, so a policy cannot make the host build giant responses.
const MAX_HEADERS: usize = 64;
const MAX_HEADER_BYTES: usize = 8 << 10;
const MAX_DECISION_BYTES: usize = 64 << 10;
const MAX_REASON_LEN: usize = 64;

fn validate_decision(decision: Decision) -> Result<Decision, PolicyFault> {
    let (headers, removed, text): (&[Header], &[String], &[&str]) = match &decision {
        Decision::Allow(a) => (&a.set_headers, &a.remove_headers, &[]),
        Decision::Deny(d) => (&d.headers, &[], &[d.message.as_str(), d.reason.as_str()]),
    };
    let total: usize = headers.iter().map(|h| h.name.len() + h.value.len()).sum::<usize>()
        + removed.iter().map(String::len).sum::<usize>()
        + text.iter().map(|t| t.len()).sum::<usize>();
    if headers.len() + removed.len() > MAX_HEADERS || total > MAX_DECISION_BYTES {
        return Err(PolicyFault::DecisionTooLarge(format!(
            "{} headers, {total} bytes (limits: {MAX_HEADERS} headers, {MAX_DECISION_BYTES} bytes)",
            headers.len() + removed.len()
        )));
    }
    for header in headers {
        if !is_header_name(&header.name) {
            return Err(PolicyFault::MalformedDecision(format!("invalid header name {:?}", header.name)));
        }
        if is_framing_header(&header.name) {
            return Err(PolicyFault::MalformedDecision(format!("a policy may not set `{}`", header.name)));
        }
        if header.value.len() > MAX_HEADER_BYTES || !is_header_value(&header.value) {
            return Err(PolicyFault::MalformedDecision(format!("invalid value for header `{}`", header.name)));
        }
    }
    if let Some(name) = removed.iter().find(|n| !is_header_name(n)) {
        return Err(PolicyFault::MalformedDecision(format!("invalid header name to remove {name:?}")));
    }
    if let Decision::Deny(d) = &decision {
        if !(400..=599).contains(&d.status) {
            return Err(PolicyFault::MalformedDecision(format!("deny status {} is not 4xx or 5xx", d.status)));
        }
        if !is_reason_code(&d.reason) {
            return Err(PolicyFault::MalformedDecision(format!("reason {:?} is not a code like `forbidden`", d.reason)));
        }
    }
    Ok(decision)
}

/// An HTTP header name (RFC 9110 token), as a policy must give it.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Headers that frame the HTTP exchange between the proxy and Sandgate (or route it): a
/// policy that could set them could smuggle a second response onto the proxy's connection.
fn is_framing_header(name: &str) -> bool {
    const FRAMING: [&str; 9] =
        ["content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade", "proxy-connection", "host"];
    FRAMING.iter().any(|f| f.eq_ignore_ascii_case(name))
}

/// A header value: visible ASCII, spaces, tabs and non-ASCII bytes; no other control byte.
pub(crate) fn is_header_value(value: &str) -> bool {
    value.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// A reason code: 1 to 64 of `[a-z0-9_.-]`.
fn is_reason_code(reason: &str) -> bool {
    (1..=MAX_REASON_LEN).contains(&reason.len())
        && reason.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bindings::sandgate::policy::types::AllowResponse;

    fn allow_with(headers: Vec<Header>) -> Decision {
        Decision::Allow(AllowResponse { set_headers: headers, remove_headers: vec![] })
    }

    #[test]
    fn swap_is_seen_in_proc_swaps_unless_the_cgroup_denies_it() {
        let header = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n";
        let zram = format!("{header}/dev/zram0                              partition\t8388604\t\t0\t\t100\n");
        assert!(!swap_possible(Some(header), None));
        assert!(!swap_possible(None, Some("max\n")));
        assert!(swap_possible(Some(&zram), None));
        assert!(swap_possible(Some(&format!("{header}/swapfile file 1048572 0 -2")), Some("max\n")));
        assert!(swap_possible(Some(&zram), Some("1073741824\n")));
        assert!(!swap_possible(Some(&zram), Some("0\n")));
    }

    #[test]
    fn decisions_are_validated() {
        let ok = allow_with(vec![Header { name: "x-user".into(), value: "alice".into() }]);
        assert!(validate_decision(ok).is_ok());
        let crlf = allow_with(vec![Header { name: "x-user".into(), value: "a\r\nx-admin: 1".into() }]);
        assert!(matches!(validate_decision(crlf), Err(PolicyFault::MalformedDecision(_))));
        let bad_name = allow_with(vec![Header { name: "x user".into(), value: "a".into() }]);
        assert!(matches!(validate_decision(bad_name), Err(PolicyFault::MalformedDecision(_))));
        for framing in ["Content-Length", "transfer-encoding", "connection", "host"] {
            let smuggle = allow_with(vec![Header { name: framing.into(), value: "0".into() }]);
            assert!(matches!(validate_decision(smuggle), Err(PolicyFault::MalformedDecision(_))), "{framing}");
        }
        let control = allow_with(vec![Header { name: "x-user".into(), value: "a\u{1b}b".into() }]);
        assert!(matches!(validate_decision(control), Err(PolicyFault::MalformedDecision(_))));
        let many = allow_with((0..65).map(|i| Header { name: format!("x-{i}"), value: "v".into() }).collect());
        assert!(matches!(validate_decision(many), Err(PolicyFault::DecisionTooLarge(_))));
        let deny = |status, reason: &str| {
            Decision::Deny(DenyResponse { status, reason: reason.into(), message: String::new(), headers: vec![] })
        };
        assert!(validate_decision(deny(403, "forbidden")).is_ok());
        assert!(matches!(validate_decision(deny(200, "forbidden")), Err(PolicyFault::MalformedDecision(_))));
        assert!(matches!(validate_decision(deny(403, "Forbidden!")), Err(PolicyFault::MalformedDecision(_))));
    }

    #[test]
    fn not_wasm_and_core_modules_are_refused_with_their_own_error() {
        let runtime = Runtime::new(RuntimeConfig { max_instances: 2, ..Default::default() }).unwrap();
        assert!(matches!(runtime.load(b"hello"), Err(LoadError::NotWasm)));
        let core = wat::parse_str("(module)").unwrap();
        assert!(matches!(runtime.load(&core), Err(LoadError::CoreModule)));
        let truncated = wat::parse_str("(component (core module))").unwrap();
        assert!(matches!(runtime.load(&truncated[..truncated.len() - 3]), Err(LoadError::Invalid(_))));
        let empty = wat::parse_str("(component)").unwrap();
        assert!(matches!(runtime.load(&empty), Err(LoadError::MissingExport(_))));
        // The right names with the wrong type: refused at load, since checks call `check`
        // without type-checking it again.
        let wrong_type = wat::parse_str(
            r#"(component
                (core module $m (func (export "check") (param i32) (result i32) local.get 0))
                (core instance $i (instantiate $m))
                (func $check (param "request" u32) (result u32) (canon lift (core func $i "check")))
                (instance $policy (export "check" (func $check)))
                (export "sandgate:policy/policy@0.1.0" (instance $policy)))"#,
        )
        .unwrap();
        match runtime.load(&wrong_type) {
            Err(LoadError::Contract(e)) => assert!(format!("{e:#}").contains("`check` has the wrong type"), "{e:#}"),
            Err(other) => panic!("wrong error: {other}"),
            Ok(_) => panic!("a `check` of the wrong type was loaded"),
        }
    }
}
