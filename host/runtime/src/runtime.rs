//! The policy runtime: compiles policy components once and evaluates each check in a fresh
//! instance.
//!
//! Object lifetimes, as in wasmtime's own guidance:
//! - one [`Runtime`] (one `Engine`, one `Linker`, one epoch ticker) per process;
//! - one [`PolicyModule`] per policy version: the component compiled once and pre-instantiated
//!   (`InstancePre`: imports resolved, type-checked) once;
//! - one `Store` and one instance per check, dropped when the check ends;
//! - for a policy that exports `prepare`, one prepared component per data version in use
//!   (`crate::prepare`), each built on an `Engine` and a thread made for that preparation and
//!   dropped after it; checks start from it like from the component as built, a store each.
//!
//! **Why a store is never reused.** A policy is ordinary code with ordinary globals. Reusing an
//! instance would let a `static`, a cache or a thread-local written during one request be read
//! by the next: exactly the cross-request leaks (a "current user" left behind, a half-updated
//! cache) that Sandgate exists to rule out. And after a trap or an epoch interrupt an instance
//! may be stopped mid-update, with a guest lock held or an allocator half-way through a change;
//! no later request may run on it. A fresh instance from the pooling allocator costs a few
//! microseconds (see `docs/BENCHMARKS.md`), so isolation is not traded for speed.
//!
//! (Longer than the house's ~400 lines: the runtime's configuration, lifetimes, evaluation and
//! fault classification read best together, and a sixth of the file is its tests.)

use crate::bindings::sandgate::policy::types::CheckRequest;
use crate::contract::validate_decision;
use crate::host_state::{HostState, TokenVerifier};
use crate::policy::{Contract, call_check, check_export, sha256_hex};
use crate::pool::EvalPool;
use crate::prepare::{PrepareThread, Prepared, Preparer, Start};
use crate::{Evaluation, LoadError, PolicyData, PolicyFault, PolicyModule, Timings};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use wasmtime::component::{Component, Linker};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, OptLevel, PoolConcurrencyLimitError, PoolingAllocationConfig,
    Store, Trap,
};

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
    /// Threads policies run on (`0`: one per core). The async threads that read requests never
    /// run a policy.
    pub eval_threads: usize,
    /// Threads one policy may occupy at once (`0`: all but one, at least one), so a slow or
    /// looping policy leaves threads for the others.
    pub max_threads_per_policy: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_instances: 64,
            timeout: Duration::from_millis(100),
            memory_limit: 16 << 20,
            queue_timeout: Duration::from_secs(1),
            full_memory_reset: false,
            eval_threads: 0,
            max_threads_per_policy: 0,
        }
    }
}

/// Core instances one policy component may create (wasmtime refuses a component with more at
/// load). A Rust policy has 2 or 3; a Python one from componentize-py (`--stub-wasi`) has 38.
const MAX_CORE_INSTANCES_PER_COMPONENT: u32 = 48;
/// Resource handles one check may hold at once; allocating past it traps (a deny).
pub(crate) const MAX_HANDLES: usize = 1024;
/// Bytes the host copies out of a policy's memory for one call into the host (its arguments)
/// or for its decision: strings, and lists at the size of the host's copy of each element.
/// Past it the call or the answer traps, a deny `policy_transfer_too_large`, before the host
/// copies more. Copies happen outside the policy's memory cap and cannot be interrupted by its
/// timeout: without this bound (wasmtime's default is 128 MiB a call) a decision naming one
/// string a hundred times made the host copy a hundred times that string. A decision the host
/// accepts (64 headers, 64 KiB) needs under a tenth of it, a token `verify-jwt` accepts a
/// sixteenth.
pub const MAX_TRANSFER: usize = 1 << 20;
/// Tables one policy component may have.
const MAX_TABLES_PER_COMPONENT: u32 = 4;

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

/// What a check may consult besides its request: the pinned snapshot's pieces.
#[derive(Clone, Default)]
pub struct EvalContext {
    /// The policy's read-only data document.
    pub data: Arc<PolicyData>,
    /// Verifies tokens for the `verify-jwt` import; `None` answers `verification_unavailable`.
    pub verifier: Option<Arc<dyn TokenVerifier>>,
    /// Whether the check may start from the policy's memory prepared for `data`.
    pub start: Start,
}

/// The policy runtime. See the module documentation for lifetimes and guarantees.
pub struct Runtime {
    core: Arc<Core>,
    linker: Linker<HostState>,
    /// Dropped (its threads joined) before the ticker stops, so a running policy is still
    /// interrupted at its deadline.
    pool: EvalPool,
    /// Prepares policies for their data versions; like the pool, stopped before the ticker.
    prepare_thread: PrepareThread,
    preparer: Preparer,
    /// Held for its `Drop`: stops and joins the ticker thread with the runtime.
    _ticker: EpochTicker,
}

/// What an evaluation needs, shared with the evaluation pool's threads.
struct Core {
    engine: Engine,
    config: RuntimeConfig,
    /// One per pool slot: bounds the checks queued or running at once.
    permits: Arc<tokio::sync::Semaphore>,
}

/// The thread that advances the engine's epoch every [`EPOCH_TICK`]; stopped and joined when
/// the runtime is dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name("sandgate-epoch".into()).spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
            }
        })?;
        Ok(EpochTicker { stop, thread: Some(thread) })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // The loop sleeps one tick at most before it sees the flag.
            let _ = thread.join();
        }
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
        if !config.full_memory_reset
            && swap_possible(read("/proc/swaps").as_deref(), read("/sys/fs/cgroup/memory.swap.max").as_deref())
        {
            tracing::warn!(
                "swap is enabled: resetting all of each policy instance's memory after every check (slower), since the written-page scan cannot see swapped-out pages"
            );
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
            // component model uses for imports returning strings or lists; every slot can
            // hold the largest component admitted (a count: instance metadata is allocated
            // when used).
            .total_core_instances(instances * MAX_CORE_INSTANCES_PER_COMPONENT)
            .total_memories(instances)
            .total_tables(instances * 4)
            .max_memories_per_component(1)
            // Per component, so one module cannot hold many pool slots' worth of instances or
            // tables: a built policy has 2 core instances (3 unfolded) and 2 tables.
            .max_core_instances_per_component(MAX_CORE_INSTANCES_PER_COMPONENT)
            .max_tables_per_component(MAX_TABLES_PER_COMPONENT)
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
        // Both contract versions: a policy links against the one it was built for.
        crate::bindings::v0_2::Authorizer::add_to_linker::<HostState, wasmtime::component::HasSelf<HostState>>(
            &mut linker,
            |s| s,
        )
        .map_err(anyhow::Error::from)?;
        crate::bindings::Authorizer::add_to_linker::<HostState, wasmtime::component::HasSelf<HostState>>(
            &mut linker,
            |s| s,
        )
        .map_err(anyhow::Error::from)?;
        // Only `wasm32-wasip2` policies import it; the rest never reach it.
        crate::wasi::add_to_linker(&mut linker).map_err(anyhow::Error::from)?;

        let ticker = EpochTicker::start(engine.clone())?;
        // At least two threads, so a policy capped at "all but one" still leaves one to the
        // others on a one-core machine (the OS shares the core between them).
        let threads = match config.eval_threads {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()).max(2),
            n => n,
        };
        let per_policy = match config.max_threads_per_policy {
            0 => threads.saturating_sub(1).max(1),
            n => n,
        };
        if per_policy >= threads && threads > 1 {
            tracing::warn!(
                threads,
                per_policy,
                "max_threads_per_policy lets one policy take every evaluation thread: a slow policy can stall the others"
            );
        }
        let pool = EvalPool::start(threads, per_policy)?;
        let permits = Arc::new(tokio::sync::Semaphore::new(instances as usize));
        let preparer = Preparer {
            counts: Default::default(),
            linker: linker.clone(),
            permits: permits.clone(),
            memory_limit: config.memory_limit,
            ticks: epoch_ticks(config.timeout),
        };
        let prepare_thread = PrepareThread::start(preparer.clone())?;
        Ok(Runtime {
            core: Arc::new(Core { engine, config, permits }),
            linker,
            pool,
            prepare_thread,
            preparer,
            _ticker: ticker,
        })
    }

    /// Instances in use by [`Runtime::check`] right now.
    pub fn instances_in_use(&self) -> usize {
        self.core.config.max_instances as usize - self.core.permits.available_permits()
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
        let component = Component::new(&self.core.engine, bytes).map_err(LoadError::Invalid)?;
        let ty = component.component_type();
        // The contract is the one whose `policy` the component exports; its imports must all
        // be that version's (or WASI).
        let exports: Vec<String> = ty.exports(&self.core.engine).map(|(name, _)| name.to_owned()).collect();
        let Some(contract) = Contract::ALL.into_iter().find(|c| exports.iter().any(|e| e == c.policy_export())) else {
            return Err(LoadError::MissingExport(exports));
        };
        let mut wasi = false;
        for (name, _) in ty.imports(&self.core.engine) {
            if crate::wasi::allowed(name) {
                wasi = true;
            } else if !contract.allowed_imports().contains(&name) {
                return Err(LoadError::UnsupportedImport(name.to_owned()));
            }
        }
        let pre = self.linker.instantiate_pre(&component).map_err(LoadError::Contract)?;
        let check = check_export(&pre, contract).map_err(LoadError::Contract)?;
        let prepare = crate::policy::prepare_export(&pre, contract).map_err(LoadError::Contract)?.filter(|_| !wasi);
        Ok(PolicyModule {
            pre,
            contract,
            check,
            digest: sha256_hex(bytes).into(),
            size: bytes.len(),
            wasi,
            load: Default::default(),
            bytes: prepare.map(|_| bytes.into()),
            preparations: prepare.map(|_| Default::default()),
        })
    }

    /// The path of the probe check every policy must answer, within its limits, before it is
    /// published. Any decision will do; a trap or a timeout is a rejection.
    pub const PROBE_PATH: &str = "/.sandgate/probe";

    /// Run the probe check: a `GET` of [`Runtime::PROBE_PATH`] at `now` (Unix seconds) without
    /// credential or data.
    pub fn probe(&self, module: &PolicyModule, now: u64) -> Result<(), PolicyFault> {
        use crate::bindings::sandgate::policy::types::{Credential, SnapshotVersions};
        let request = Arc::new(CheckRequest {
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
            now,
            versions: SnapshotVersions {
                snapshot: 0,
                policy_digest: module.digest().into(),
                key_set: 0,
                revocations: 0,
                data: 0,
            },
        });
        // The probe takes a pool slot like any check, waiting up to the queue timeout.
        let deadline = std::time::Instant::now() + self.core.config.queue_timeout;
        let _permit = loop {
            match self.core.permits.try_acquire() {
                Ok(permit) => break permit,
                Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
                Err(_) => return Err(PolicyFault::Overloaded),
            }
        };
        // As built: the probe's empty data is not worth preparing for.
        let context = EvalContext { start: Start::Built, ..Default::default() };
        match self.evaluate(module, &request, &context).fault {
            Some(fault) => Err(fault),
            None => Ok(()),
        }
    }

    /// Evaluate one check in a fresh instance on the evaluation pool, never on the calling
    /// (async) thread. The check waits at most the queue timeout for a pool slot and a thread
    /// (its policy's share of threads included); past it, it is denied as overloaded.
    pub async fn check(&self, module: &PolicyModule, request: Arc<CheckRequest>, context: EvalContext) -> Evaluation {
        let deadline = Instant::now() + self.core.config.queue_timeout;
        let (permit, waited) = match self.core.permits.clone().try_acquire_owned() {
            Ok(permit) => (permit, false),
            Err(_) => match tokio::time::timeout_at(deadline.into(), self.core.permits.clone().acquire_owned()).await {
                Ok(Ok(permit)) => (permit, true),
                _ => return overloaded(true),
            },
        };
        let mut evaluation = self.run_on_pool(module, request, context, permit, deadline).await;
        evaluation.queued |= waited;
        evaluation
    }

    /// Evaluate one check only if a pool slot is free right now (shadow evaluations, which
    /// must never make a live check wait); `None` if none is.
    pub async fn try_check(
        &self,
        module: &PolicyModule,
        request: Arc<CheckRequest>,
        context: EvalContext,
    ) -> Option<Evaluation> {
        let permit = self.core.permits.clone().try_acquire_owned().ok()?;
        let deadline = Instant::now() + self.core.config.queue_timeout;
        Some(self.run_on_pool(module, request, context, permit, deadline).await)
    }

    async fn run_on_pool(
        &self,
        module: &PolicyModule,
        request: Arc<CheckRequest>,
        context: EvalContext,
        permit: tokio::sync::OwnedSemaphorePermit,
        deadline: Instant,
    ) -> Evaluation {
        let (send, mut receive) = tokio::sync::oneshot::channel();
        let (core, job_module) = (self.core.clone(), module.clone());
        // Never a compile on an executor thread: `Prepared` is `Auto` here.
        let prepared = match context.start {
            Start::Prepared => self.prepare_thread.ready_or_queue(module, &context.data),
            _ => self.prepared(module, &context),
        };
        let ticket = self.pool.submit(&module.load, deadline, move || {
            let _ = send.send(core.evaluate(&job_module, prepared.as_deref(), &request, &context));
        });
        // If this future is dropped (the client went away), a job not started yet never runs.
        let abandon_on_drop = AbandonOnDrop(ticket);
        let evaluation = match tokio::time::timeout_at(deadline.into(), &mut receive).await {
            Ok(Ok(evaluation)) => evaluation,
            // The pool dropped the job at its deadline (or the job panicked).
            Ok(Err(_)) => overloaded(true),
            // Still queued at the deadline: give up on it, unless it has just started.
            Err(_) if abandon_on_drop.0.abandon() => overloaded(true),
            Err(_) => receive.await.unwrap_or_else(|_| overloaded(true)),
        };
        // The pool slot is held until the evaluation is over or will never start.
        drop(permit);
        evaluation
    }

    /// Evaluate one check in a fresh instance: new store, instantiate, call, drop. If the pool
    /// is full the check is denied as overloaded; [`Runtime::check`] queues instead.
    pub fn evaluate(&self, module: &PolicyModule, request: &Arc<CheckRequest>, context: &EvalContext) -> Evaluation {
        let prepared = self.prepared(module, context);
        let prepared = prepared.as_deref();
        // `wasmtime-wasi` runs WASI's blocking calls (a `println!`, a sleep) by entering tokio,
        // which panics inside an async context: there, a WASI policy runs on a thread of its
        // own. (The evaluation pool's threads are never in one.)
        if module.wasi && tokio::runtime::Handle::try_current().is_ok() {
            return std::thread::scope(|scope| {
                let evaluation = std::thread::Builder::new()
                    .name("sandgate-eval-wasi".into())
                    .spawn_scoped(scope, || self.core.evaluate(module, prepared, request, context));
                match evaluation.map(|thread| thread.join()) {
                    Ok(Ok(evaluation)) => evaluation,
                    _ => Evaluation::fault(PolicyFault::Instantiate("no thread to evaluate on".into()), Vec::new(), 0),
                }
            });
        }
        self.core.evaluate(module, prepared, request, context)
    }

    /// The prepared start a check of `module` with `context` takes, if any (see [`Start`]).
    fn prepared(&self, module: &PolicyModule, context: &EvalContext) -> Option<Arc<Prepared>> {
        match context.start {
            Start::Auto => self.prepare_thread.ready_or_queue(module, &context.data),
            Start::Built => None,
            Start::Prepared => self.preparer.ready_or_prepare(module, &context.data),
        }
    }

    /// How often preparing came out each way since the runtime started.
    pub fn prepare_counts(&self) -> crate::PrepareCounts {
        self.preparer.counts.get()
    }

    /// Prepare `module` for `data` now, on this thread, unless it is prepared already (what a
    /// check with [`Start::Auto`] would otherwise start in the background). Returns whether
    /// checks of `module` on `data` start prepared from now on.
    pub fn prepare(&self, module: &PolicyModule, data: &Arc<PolicyData>) -> bool {
        self.preparer.ready_or_prepare(module, data).is_some()
    }

    #[cfg(feature = "bench-internals")]
    pub(crate) fn new_store(
        &self,
        request: Arc<CheckRequest>,
        context: &EvalContext,
        wasi: Option<crate::wasi::WasiState>,
    ) -> Store<HostState> {
        self.core.new_store(request, context, wasi)
    }
}

/// Gives up on a queued job when the check waiting for it goes away.
struct AbandonOnDrop(crate::pool::Ticket);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.abandon();
    }
}

/// A deny for a check that found no free slot or thread in time.
fn overloaded(queued: bool) -> Evaluation {
    let mut evaluation = Evaluation::fault(PolicyFault::Overloaded, Vec::new(), 0);
    evaluation.queued = queued;
    evaluation
}

impl Core {
    fn evaluate(
        &self,
        module: &PolicyModule,
        prepared: Option<&Prepared>,
        request: &Arc<CheckRequest>,
        context: &EvalContext,
    ) -> Evaluation {
        let started = std::time::Instant::now();
        let mut timings = Timings::default();
        let wasi = module.wasi.then(|| crate::wasi::WasiState::new(&request.request_id, request.now));
        let mut store = self.new_store(request.clone(), context, wasi);
        let (pre, check) = match prepared {
            Some(prepared) => (&prepared.pre, prepared.check),
            None => (&module.pre, module.check),
        };
        let result = pre.instantiate(&mut store).map_err(|e| classify_instantiation(&e, &store)).and_then(|instance| {
            timings.instantiate = started.elapsed();
            let func = instance
                .get_func(&mut store, check)
                .ok_or(PolicyFault::Trap("the `check` export is missing".into()))?;
            call_check(&mut store, func, module.contract, request).map_err(|e| classify_trap(&e, &store))
        });
        timings.call = started.elapsed().saturating_sub(timings.instantiate);
        store.data_mut().collect_output();
        let logs = std::mem::take(&mut store.data_mut().logs);
        let memory_grows = store.data().limiter.grows;
        let mut evaluation = match result.and_then(validate_decision) {
            Ok(decision) => {
                Evaluation { decision, fault: None, logs, memory_grows, queued: false, timings, prepared: false }
            }
            Err(fault) => Evaluation::fault(fault, logs, memory_grows),
        };
        evaluation.timings = timings;
        evaluation.prepared = prepared.is_some();
        evaluation
    }

    fn new_store(
        &self,
        request: Arc<CheckRequest>,
        context: &EvalContext,
        wasi: Option<crate::wasi::WasiState>,
    ) -> Store<HostState> {
        let mut state =
            HostState::new(request, context.data.clone(), context.verifier.clone(), self.config.memory_limit);
        state.wasi = wasi.map(Box::new);
        limited_store(&self.engine, state, epoch_ticks(self.config.timeout))
    }
}

/// Epoch ticks a store may run for to reach `timeout`.
pub(crate) fn epoch_ticks(timeout: Duration) -> u64 {
    timeout.as_micros().div_ceil(EPOCH_TICK.as_micros()) as u64 + 1
}

/// A store holding `state` with a check's limits: memory (`state`'s cap), resource handles,
/// what one call may copy, and `ticks` of the engine's epoch.
pub(crate) fn limited_store(engine: &Engine, state: HostState, ticks: u64) -> Store<HostState> {
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limiter);
    // Handles to resources (a WASI stream, a pollable, a guest's own resource) cost host
    // memory outside the instance's cap: a policy gets a few, not wasmtime's 100,000.
    store.set_max_component_handles(MAX_HANDLES);
    store.set_hostcall_fuel(MAX_TRANSFER);
    store.set_epoch_deadline(ticks);
    store
}

/// Whether this process's memory may be swapped out: `/proc/swaps` (its text, if readable)
/// lists a swap device or file, and the cgroup's `memory.swap.max` (cgroup v2, if readable) is
/// not `0` (a container can be denied swap on a host that has it).
fn swap_possible(proc_swaps: Option<&str>, cgroup_swap_max: Option<&str>) -> bool {
    let host_has_swap = proc_swaps.is_some_and(|text| text.lines().skip(1).any(|line| !line.trim().is_empty()));
    host_has_swap && cgroup_swap_max.is_none_or(|max| max.trim() != "0")
}

fn classify_instantiation(error: &wasmtime::Error, store: &Store<HostState>) -> PolicyFault {
    if store.data().limiter.exceeded() {
        return PolicyFault::OutOfMemory;
    }
    // The pooling allocator refuses a new instance when every slot is taken.
    if error.downcast_ref::<PoolConcurrencyLimitError>().is_some() {
        return PolicyFault::Overloaded;
    }
    if let Some(exit) = error.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return PolicyFault::Exited(exit.0);
    }
    // A start function or initialiser may also trap.
    match error.downcast_ref::<Trap>() {
        Some(_) => classify_trap(error, store),
        None => PolicyFault::Instantiate(format!("{error:#}")),
    }
}

/// Whether wasmtime refused to copy more than [`MAX_TRANSFER`] out of the policy's memory. Its
/// error type is private, so it is told apart by its message (`tests/hostile.rs` holds it to
/// its reason code).
fn is_transfer_too_large(error: &wasmtime::Error) -> bool {
    error.chain().any(|cause| cause.to_string().contains("fuel allocated for hostcalls has been exhausted"))
}

fn classify_trap(error: &wasmtime::Error, store: &Store<HostState>) -> PolicyFault {
    if store.data().limiter.exceeded() {
        // Growth was refused; the guest's allocator failed and it aborted.
        return PolicyFault::OutOfMemory;
    }
    if let Some(exit) = error.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return PolicyFault::Exited(exit.0);
    }
    if is_transfer_too_large(error) {
        return PolicyFault::TransferTooLarge;
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => PolicyFault::Timeout,
        Some(Trap::StackOverflow) => PolicyFault::StackOverflow,
        Some(Trap::UnreachableCodeReached) => PolicyFault::Panicked,
        Some(trap) => PolicyFault::Trap(trap.to_string()),
        None => PolicyFault::Trap(format!("{error:#}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
    fn a_component_wanting_more_than_its_share_of_the_pool_is_refused_at_load() {
        let runtime = Runtime::new(RuntimeConfig { max_instances: 2, ..Default::default() }).unwrap();
        let instances = |n: usize| {
            let body: String = (0..n).map(|_| "(core instance (instantiate $m))").collect();
            wat::parse_str(format!("(component (core module $m) {body})")).unwrap()
        };
        let over = MAX_CORE_INSTANCES_PER_COMPONENT as usize + 1;
        match runtime.load(&instances(over)) {
            Err(LoadError::Invalid(e)) => assert!(format!("{e:#}").contains("core module instances"), "{e:#}"),
            other => panic!("{over} core instances: {:?}", other.err()),
        }
        // Within the limit the same shape gets as far as the contract check.
        assert!(matches!(runtime.load(&instances(over - 1)), Err(LoadError::MissingExport(_))));
        let tables: String = (0..3).map(|i| format!("(table $t{i} 1 funcref)")).collect();
        let many_tables =
            wat::parse_str(format!("(component (core module $m {tables}) (core instance (instantiate $m)))")).unwrap();
        assert!(matches!(runtime.load(&many_tables), Err(LoadError::Invalid(_))), "three tables in one module");
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
        // without type-checking it again. (0.1.0's `check` takes a request, 0.2.0's nothing.)
        for version in ["0.1.0", "0.2.0"] {
            let wrong_type = wat::parse_str(format!(
                r#"(component
                    (core module $m (func (export "check") (param i32) (result i32) local.get 0))
                    (core instance $i (instantiate $m))
                    (func $check (param "request" u32) (result u32) (canon lift (core func $i "check")))
                    (instance $policy (export "check" (func $check)))
                    (export "sandgate:policy/policy@{version}" (instance $policy)))"#
            ))
            .unwrap();
            match runtime.load(&wrong_type) {
                Err(LoadError::Contract(e)) => {
                    assert!(format!("{e:#}").contains("`check` has the wrong type"), "{version}: {e:#}")
                }
                Err(other) => panic!("{version}: wrong error: {other}"),
                Ok(_) => panic!("{version}: a `check` of the wrong type was loaded"),
            }
        }
    }

    /// A component is one contract version throughout: exporting one version's `policy` while
    /// importing another's interfaces is refused at load, naming the import.
    #[test]
    fn a_policy_mixing_contract_versions_is_refused() {
        let runtime = Runtime::new(RuntimeConfig { max_instances: 2, ..Default::default() }).unwrap();
        for (import, export) in [("host@0.1.0", "policy@0.2.0"), ("request@0.2.0", "policy@0.1.0")] {
            let mixed = wat::parse_str(format!(
                r#"(component
                    (import "sandgate:policy/{import}" (instance))
                    (instance $policy)
                    (export "sandgate:policy/{export}" (instance $policy)))"#
            ))
            .unwrap();
            match runtime.load(&mixed) {
                Err(LoadError::UnsupportedImport(name)) => assert_eq!(name, format!("sandgate:policy/{import}")),
                Err(other) => panic!("{import} with {export}: wrong error: {other}"),
                Ok(_) => panic!("{import} with {export} was loaded"),
            }
        }
    }
}
