//! Preparing a policy for a data version: its `prepare` export run once, in an instance of its
//! own, and that instance's memory kept as the starting state of every check on that version.
//!
//! A policy that parses its data document in every check (the RBAC example spends about a
//! fifth of a check on it, docs/BENCHMARKS.md) can parse it once in `prepare` instead. The host
//! then snapshots the instance (`wasmtime-wizer`: every memory and global of its core modules)
//! into a new component whose data segments hold that state, and compiles it. Every check
//! still gets a fresh instance of that component: its memory is mapped copy-on-write from the
//! snapshot and reset after the check like any other, so what a check writes still dies with
//! it. The snapshot depends on the module and on the data alone (the request `prepare` sees is
//! empty, at time 0, without a verifier), so it is kept per data digest.
//!
//! Preparation runs on a thread of its own, off the request path. Until it is done (or when it
//! fails, or returns `false`), checks start from the component as built; the [`Evaluation`]
//! says which start a check had, so a replay can take the same one.
//!
//! [`Evaluation`]: crate::Evaluation

use crate::bindings::sandgate::policy::types::{CheckRequest, Credential, SnapshotVersions};
use crate::host_state::HostState;
use crate::policy::PolicyModule;
use crate::policy_data::PolicyData;
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use wasmtime::Store;
use wasmtime::component::{Component, ComponentExportIndex, Instance, InstancePre, Linker, WasmList};

/// The export a policy prepares with: `prepare: func() -> bool`.
pub(crate) const PREPARE_EXPORT: &str = "sandgate:policy/prepare@0.2.0";

/// Preparations one module remembers at most. It keeps those of every data version still in
/// use (a snapshot holds it), so this only bounds a module loaded with very many documents.
const MAX_REMEMBERED: usize = 64;

/// Preparations of data versions no snapshot holds any more that one module keeps, the most
/// recent: a document loaded again (data toggled back, a fleet re-applying a revision) starts
/// prepared at once.
const MAX_UNUSED: usize = 4;

/// Preparations waiting for the background thread; past it a check starts as built and does
/// not queue one (the next check asks again).
const QUEUE: usize = 32;

/// Instructions `prepare` may run (wasmtime fuel); past them the preparation fails and
/// checks start from the component as built.
pub const PREPARE_FUEL: u64 = 1_000_000_000;

/// How long `prepare` may run (the engine's epoch; host calls included); past it the
/// preparation fails and checks start from the component as built.
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a finished preparation waits for a pool slot to instantiate its result once.
const PERMIT_WAIT: Duration = Duration::from_secs(30);

/// How a check starts: from the component as built, or from its memory prepared for the
/// check's data version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Start {
    /// Prepared if the preparation for this data version is ready; otherwise as built, and the
    /// preparation is started in the background. What a sidecar does.
    #[default]
    Auto,
    /// Always as built.
    Built,
    /// Prepared, preparing now (on the calling thread) if it has not been; as built only when
    /// the policy does not prepare or its preparation fails. What a replay of a prepared
    /// check does. Only [`Runtime::evaluate`](crate::Runtime::evaluate) prepares on the
    /// calling thread; through the async [`Runtime::check`](crate::Runtime::check) this is
    /// [`Start::Auto`], which never blocks an executor thread on a compile.
    Prepared,
}

/// A module's memory prepared for one data version, compiled and pre-instantiated.
pub(crate) struct Prepared {
    pub(crate) pre: InstancePre<HostState>,
    pub(crate) check: ComponentExportIndex,
}

#[derive(Clone)]
enum State {
    /// Being prepared.
    Pending,
    Ready(Arc<Prepared>),
    /// `prepare` returned `false`, or failed: checks start as built.
    Unprepared,
}

/// What became of preparing one module, by data digest; shared by every clone of the module.
#[derive(Default)]
pub(crate) struct Preparations {
    entries: ArcSwap<Vec<Entry>>,
    write: Mutex<()>,
}

#[derive(Clone)]
struct Entry {
    digest: Arc<str>,
    /// The data it was prepared for: the entry is kept while some snapshot still holds it.
    data: Weak<PolicyData>,
    state: State,
}

impl Preparations {
    /// What became of preparing for `data` (`Some`), or `None` when `data` is new to this
    /// module: it is then marked pending, atomically, and the caller prepares it. A known
    /// digest whose entry was made for data no snapshot holds any more (the same document
    /// loaded again) is kept, for this `data`. One lock-free read when the digest is known.
    fn claim(&self, data: &Arc<PolicyData>) -> Option<State> {
        let entries = self.entries.load();
        if let Some(entry) = entries.iter().find(|e| &*e.digest == data.digest() && e.data.strong_count() > 0) {
            return Some(entry.state.clone());
        }
        let mut known = None;
        self.change(data, |state| match state {
            Some(state) => {
                known = Some(state.clone());
                Some(Some(state.clone()))
            }
            None => Some(Some(State::Pending)),
        });
        known
    }

    /// Record `state` for `data` (`None`: forget it, so that the next check claims it again).
    fn set(&self, data: &Arc<PolicyData>, state: Option<State>) {
        self.change(data, |_| Some(state));
    }

    /// Apply `change` to the state of `data` under the write lock: it returns the new state
    /// (`Some(None)`: forget it) or `None` to leave everything as it is. Of the entries whose
    /// data no snapshot holds any more, the [`MAX_UNUSED`] most recent are kept.
    fn change(&self, data: &Arc<PolicyData>, change: impl FnOnce(Option<&State>) -> Option<Option<State>>) {
        let _write = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.entries.load();
        let known = current.iter().position(|e| &*e.digest == data.digest());
        let Some(new) = change(known.map(|i| &current[i].state)) else { return };
        let mut unused = 0;
        let mut entries: Vec<Entry> = current
            .iter()
            .enumerate()
            .filter(|&(i, e)| {
                let keep = e.data.strong_count() > 0 || {
                    unused += 1;
                    unused <= MAX_UNUSED
                };
                Some(i) != known && keep
            })
            .map(|(_, e)| e.clone())
            .collect();
        if let Some(state) = new {
            // Newest first; past the bound the oldest go.
            entries.insert(0, Entry { digest: data.digest().into(), data: Arc::downgrade(data), state });
            entries.truncate(MAX_REMEMBERED);
        }
        self.entries.store(Arc::new(entries));
    }
}

/// How often preparing a policy for a data version came out each way, since the runtime
/// started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrepareCounts {
    /// Prepared: checks on that data version start from the snapshot.
    pub prepared: u64,
    /// `prepare` returned `false`: nothing to keep.
    pub declined: u64,
    /// `prepare` trapped, ran out of fuel or memory, or the snapshot did not compile.
    pub failed: u64,
}

#[derive(Default)]
pub(crate) struct Counts {
    prepared: AtomicU64,
    declined: AtomicU64,
    failed: AtomicU64,
}

impl Counts {
    pub(crate) fn get(&self) -> PrepareCounts {
        PrepareCounts {
            prepared: self.prepared.load(Ordering::Relaxed),
            declined: self.declined.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

/// What preparing needs from the runtime.
#[derive(Clone)]
pub(crate) struct Preparer {
    pub(crate) counts: Arc<Counts>,
    pub(crate) linker: Linker<HostState>,
    pub(crate) permits: Arc<tokio::sync::Semaphore>,
    pub(crate) memory_limit: usize,
    /// Epoch ticks instantiating the prepared component may take (a check's).
    pub(crate) ticks: u64,
}

impl Preparer {
    /// The engine and linker for the instance that is snapshotted: an engine of its own, outside
    /// the pool, made for one preparation and dropped after it. Reading the instance's memory
    /// whole maps every page of it, and a pool slot keeps such pages mapped, so every later
    /// check in that slot would pay to scan them (twice the cost of a check, as measured). Its
    /// code is compiled without optimisation (it runs once); fuel and a watchdog on its epoch
    /// bound it. Dropping the engine after each preparation returns its compiler's buffers
    /// (kept per engine, ~7 MiB once a policy had been prepared).
    fn snapshot_linker() -> wasmtime::Result<Linker<HostState>> {
        let mut config = wasmtime::Config::new();
        config
            .consume_fuel(true)
            .epoch_interruption(true)
            .cranelift_opt_level(wasmtime::OptLevel::None)
            .parallel_compilation(false);
        let engine = wasmtime::Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        crate::bindings::v0_2::Authorizer::add_to_linker::<HostState, wasmtime::component::HasSelf<HostState>>(
            &mut linker,
            |s| s,
        )?;
        Ok(linker)
    }
}

/// The background thread preparing modules for the data versions checks use.
pub(crate) struct PrepareThread {
    jobs: Option<std::sync::mpsc::SyncSender<(PolicyModule, Arc<PolicyData>)>>,
    /// Set when the runtime is dropped: the jobs still queued are skipped.
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PrepareThread {
    pub(crate) fn start(preparer: Preparer) -> std::io::Result<Self> {
        let (jobs, receive) = std::sync::mpsc::sync_channel::<(PolicyModule, Arc<PolicyData>)>(QUEUE);
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new().name("sandgate-prepare".into()).spawn(move || {
            // Ends when the runtime drops its sender.
            while let Ok((module, data)) = receive.recv() {
                let Some(preparable) = module.preparable() else { continue };
                // A data version no snapshot holds any more (replaced while this waited behind
                // others) is not worth a compile; a check that meets it again queues it again.
                if stopping.load(Ordering::Relaxed) || Arc::strong_count(&data) == 1 {
                    preparable.set(&data, None);
                    continue;
                }
                // On a thread of its own, which ends with the job: the allocator gives back
                // what a thread's compiles left in its heap only once the thread is gone
                // (~3 MiB measured).
                std::thread::scope(|scope| {
                    let job = std::thread::Builder::new()
                        .name("sandgate-prepare-job".into())
                        .spawn_scoped(scope, || preparer.prepare_now(&module, &data));
                    if job.is_err() {
                        preparable.set(&data, None);
                    }
                });
            }
        })?;
        Ok(PrepareThread { jobs: Some(jobs), stop, thread: Some(thread) })
    }

    /// The prepared start of `module` for `data`, if ready; otherwise, if the module prepares
    /// and `data` is new to it, queue its preparation.
    pub(crate) fn ready_or_queue(&self, module: &PolicyModule, data: &Arc<PolicyData>) -> Option<Arc<Prepared>> {
        let preparable = module.preparable()?;
        match preparable.claim(data) {
            Some(State::Ready(prepared)) => Some(prepared),
            Some(State::Pending | State::Unprepared) => None,
            None => {
                // A full queue: this check starts as built, and a later one asks again.
                let job = (module.clone(), data.clone());
                if self.jobs.as_ref().is_none_or(|jobs| jobs.try_send(job).is_err()) {
                    preparable.set(data, None);
                }
                None
            }
        }
    }
}

impl Drop for PrepareThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Preparer {
    /// Prepare `module` for `data` on this thread, unless that is done or under way; the
    /// prepared start if there is one now.
    pub(crate) fn ready_or_prepare(&self, module: &PolicyModule, data: &Arc<PolicyData>) -> Option<Arc<Prepared>> {
        let preparable = module.preparable()?;
        match preparable.claim(data) {
            Some(State::Ready(prepared)) => Some(prepared),
            // Declined or failed: not tried again for this data version.
            Some(State::Unprepared) => None,
            // Whether pending on the background thread or new (now claimed), prepare it here:
            // the result is the same, and the last one to finish is kept.
            Some(State::Pending) | None => self.prepare_now(module, data),
        }
    }

    /// Prepare `module` for `data` and record the outcome.
    fn prepare_now(&self, module: &PolicyModule, data: &Arc<PolicyData>) -> Option<Arc<Prepared>> {
        let preparable = module.preparable()?;
        let started = Instant::now();
        // Wizer's own code may panic on a component it does not expect: that is a failed
        // preparation, never a lost thread.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.prepare(module, data)))
            .unwrap_or_else(|_| Err(PrepareError::Failed("the preparation panicked".into())));
        let state = match outcome {
            Ok(Some(prepared)) => {
                tracing::info!(
                    policy_digest = module.digest(),
                    data_digest = data.digest(),
                    ms = started.elapsed().as_millis() as u64,
                    "policy prepared for its data"
                );
                self.counts.prepared.fetch_add(1, Ordering::Relaxed);
                Some(State::Ready(Arc::new(prepared)))
            }
            Ok(None) => {
                self.counts.declined.fetch_add(1, Ordering::Relaxed);
                Some(State::Unprepared)
            }
            Err(PrepareError::Busy) => None,
            Err(PrepareError::Failed(error)) => {
                self.counts.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    policy_digest = module.digest(),
                    data_digest = data.digest(),
                    %error,
                    "the policy could not be prepared for its data: its checks start from the component as built"
                );
                Some(State::Unprepared)
            }
        };
        let ready = match &state {
            Some(State::Ready(prepared)) => Some(prepared.clone()),
            _ => None,
        };
        preparable.set(data, state);
        ready
    }

    /// Run `prepare` in an instrumented instance; if it asks to be kept, snapshot that
    /// instance and compile the snapshot.
    fn prepare(&self, module: &PolicyModule, data: &Arc<PolicyData>) -> Result<Option<Prepared>, PrepareError> {
        let failed = |what: &str, e: wasmtime::Error| PrepareError::Failed(format!("{what}: {e:#}"));
        let Some(bytes) = module.bytes.as_ref() else { return Ok(None) };
        let engine = module.pre.engine();
        let snapshot_linker = Self::snapshot_linker().map_err(|e| failed("an engine to prepare on", e))?;
        let snapshot_engine = snapshot_linker.engine();

        let mut wizer = wasmtime_wizer::Wizer::new();
        // The init function wizer would remove is a top-level export; `prepare` is not one.
        wizer.init_func("sandgate-prepare").keep_init_func(true);
        let (cx, instrumented) = wizer.instrument_component(bytes).map_err(|e| failed("instrumenting", e))?;
        let component =
            Component::new(snapshot_engine, &instrumented).map_err(|e| failed("compiling for preparation", e))?;
        // A check's limits on what a call may copy and on resource handles, so that `prepare`
        // fails where a check would; fuel and the epoch bound its time.
        let mut store = self.store(snapshot_engine, data);
        store.set_fuel(PREPARE_FUEL).map_err(|e| failed("fuel", e))?;
        // The watchdog advances this engine's epoch once, at the timeout: then it traps.
        store.set_epoch_deadline(1);
        let watchdog = Watchdog::start(snapshot_engine.clone(), PREPARE_TIMEOUT);
        let instance = snapshot_linker.instantiate(&mut store, &component).map_err(|e| failed("instantiating", e))?;
        let (_, export) = component
            .get_export(None, PREPARE_EXPORT)
            .ok_or_else(|| PrepareError::Failed("the instrumented component lost `prepare`".into()))?;
        let (_, index) = component
            .get_export(Some(&export), "prepare")
            .ok_or_else(|| PrepareError::Failed("the instrumented component lost `prepare`".into()))?;
        // Most SDK policies keep the default `prepare`, which returns `false`.
        if !call_prepare(&mut store, &instance, index).map_err(|e| failed("`prepare`", e))? {
            return Ok(None);
        }
        // Reading a memory whole: no cap on what one call may copy.
        store.set_hostcall_fuel(usize::MAX);
        let stack_top = stack_top(bytes);
        let mut state =
            Access { store: &mut store, instance, error: None, stack_top, first_global: None, after_memory: false };
        let snapshot = poll_ready(wizer.snapshot_component(&cx, &mut state))
            .ok_or_else(|| PrepareError::Failed("the snapshot did not complete".into()))?
            .map_err(|e| failed("snapshotting", e));
        if let Some(error) = state.error {
            return Err(failed("reading the prepared state", error));
        }
        let snapshot = snapshot?;
        drop(store);
        drop(watchdog);

        let component = Component::new(engine, &snapshot).map_err(|e| failed("compiling the prepared component", e))?;
        let pre = self.linker.instantiate_pre(&component).map_err(|e| failed("linking the prepared component", e))?;
        let check = crate::policy::check_export(&pre, module.contract).map_err(|e| failed("its `check`", e))?;
        // One instance now, so a snapshot the pool cannot hold fails here, not in checks. It
        // takes a pool slot like a check's.
        let _permit = self.permit()?;
        let mut store = self.store(engine, data);
        pre.instantiate(&mut store).map_err(|e| failed("instantiating the prepared component", e))?;
        Ok(Some(Prepared { pre, check }))
    }

    fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, PrepareError> {
        let deadline = Instant::now() + PERMIT_WAIT;
        loop {
            match self.permits.clone().try_acquire_owned() {
                Ok(permit) => return Ok(permit),
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
                Err(_) => return Err(PrepareError::Busy),
            }
        }
    }

    /// A store with a check's limits for `prepare`: the data being prepared, an empty request
    /// at time 0, no verifier.
    fn store(&self, engine: &wasmtime::Engine, data: &Arc<PolicyData>) -> Store<HostState> {
        let request = Arc::new(CheckRequest {
            request_id: String::new(),
            method: String::new(),
            scheme: String::new(),
            host: String::new(),
            path: "/".into(),
            query: None,
            headers: Vec::new(),
            peer: None,
            body: None,
            credential: Credential::None,
            now: 0,
            versions: SnapshotVersions {
                snapshot: 0,
                policy_digest: String::new(),
                key_set: 0,
                revocations: 0,
                data: 0,
            },
        });
        crate::runtime::limited_store(
            engine,
            HostState::new(request, data.clone(), None, self.memory_limit),
            self.ticks,
        )
    }
}

/// Advances `engine`'s epoch once after `timeout`, unless dropped first.
struct Watchdog {
    done: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(engine: wasmtime::Engine, timeout: Duration) -> Watchdog {
        let (done, wait) = std::sync::mpsc::channel::<()>();
        // Without a thread there is no wall-clock bound, only fuel.
        let thread = std::thread::Builder::new()
            .name("sandgate-prepare-watchdog".into())
            .spawn(move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(timeout) {
                    engine.increment_epoch();
                }
            })
            .ok();
        Watchdog { done: Some(done), thread }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

enum PrepareError {
    /// No pool slot came free in time: tried again on a later check.
    Busy,
    Failed(String),
}

fn call_prepare(
    store: &mut Store<HostState>,
    instance: &Instance,
    index: ComponentExportIndex,
) -> wasmtime::Result<bool> {
    let prepare = instance.get_typed_func::<(), (bool,)>(&mut *store, index)?;
    prepare.call(&mut *store, ()).map(|(keep,)| keep)
}

/// Poll a future that never waits (every call it makes is synchronous) to its end.
fn poll_ready<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut context) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}

/// Where the shadow stack of a component's memory ends, if its module lays it out below all
/// of its data (LLVM's `--stack-first`, what Rust's wasm targets do): its first global, the
/// stack pointer, starts there and no data segment lies below it.
///
/// `prepare` leaves its dead stack frames below the stack pointer. Snapshotted, they would
/// start the memory image a page or more lower than the component's own, and every check
/// would pay for the larger image (docs/BENCHMARKS.md); they are zeroed instead, as they are
/// in the component as built. Nothing live is ever below the stack pointer once `prepare` has
/// returned.
fn stack_top(component: &[u8]) -> Option<u32> {
    use wasmparser::{Encoding, Operator, Payload};
    #[derive(Default)]
    struct Module {
        memory: bool,
        first_global: Option<(bool, Option<i32>)>,
        mutable_globals: bool,
        lowest_data: Option<i64>,
    }
    let mut modules: Vec<Module> = Vec::new();
    let const_i32 = |expr: &wasmparser::ConstExpr| {
        let mut ops = expr.get_operators_reader();
        match (ops.read().ok()?, ops.read().ok()?) {
            (Operator::I32Const { value }, Operator::End) => Some(value),
            _ => None,
        }
    };
    for payload in wasmparser::Parser::new(0).parse_all(component) {
        match payload.ok()? {
            Payload::Version { encoding: Encoding::Module, .. } => modules.push(Module::default()),
            Payload::MemorySection(memories) => modules.last_mut()?.memory = memories.count() > 0,
            Payload::GlobalSection(globals) => {
                let module = modules.last_mut()?;
                let globals: Vec<_> = globals.into_iter().collect::<Result<_, _>>().ok()?;
                module.mutable_globals = globals.iter().any(|g| g.ty.mutable);
                if let Some(global) = globals.first() {
                    let is_i32 = global.ty.content_type == wasmparser::ValType::I32 && global.ty.mutable;
                    module.first_global = Some((is_i32, const_i32(&global.init_expr)));
                }
            }
            Payload::ImportSection(imports) => {
                // An imported global would be index 0 instead; an imported memory would take
                // another module's data segments.
                let imports: Vec<_> = imports.into_imports().collect::<Result<_, _>>().ok()?;
                if imports
                    .iter()
                    .any(|i| matches!(i.ty, wasmparser::TypeRef::Global(_) | wasmparser::TypeRef::Memory(_)))
                {
                    return None;
                }
            }
            Payload::DataSection(data) => {
                let module = modules.last_mut()?;
                for segment in data {
                    if let wasmparser::DataKind::Active { offset_expr, .. } = segment.ok()?.kind {
                        let offset = i64::from(const_i32(&offset_expr)? as u32);
                        module.lowest_data = Some(module.lowest_data.map_or(offset, |low| low.min(offset)));
                    }
                }
            }
            _ => {}
        }
    }
    // One module with a memory, and no other with mutable globals: the first global wizer reads
    // is then that module's first.
    let mut with_memory = modules.iter().filter(|m| m.memory);
    let module = with_memory.next()?;
    if with_memory.next().is_some() || modules.iter().filter(|m| m.mutable_globals).count() != 1 {
        return None;
    }
    let (true, Some(top)) = module.first_global? else { return None };
    let top = top as u32;
    // Data at or above the stack's top: the stack is below all of it. (No data segment at all
    // says nothing of where the statics are.)
    (module.lowest_data? >= i64::from(top)).then_some(top)
}

/// Wizer's view of the instrumented instance: its accessor exports, called synchronously.
/// Wizer's interface cannot fail, so the first error is kept here and checked afterwards.
struct Access<'a> {
    store: &'a mut Store<HostState>,
    instance: Instance,
    error: Option<wasmtime::Error>,
    /// See [`stack_top`].
    stack_top: Option<u32>,
    /// The first global wizer read since it last read a memory: a module's globals are read
    /// before its memory, in order, and only the memory's module has mutable globals
    /// ([`stack_top`]), so this is the stack pointer of that memory.
    first_global: Option<i32>,
    /// Whether the last thing read was a memory (wizer reads each memory twice: to find its
    /// non-zero ranges, then to copy them; both reads get the same zeroing).
    after_memory: bool,
}

impl Access<'_> {
    fn call<R: wasmtime::component::ComponentType + wasmtime::component::Lift + 'static>(
        &mut self,
        instance: &str,
        func: &str,
    ) -> Option<R> {
        if self.error.is_some() {
            return None;
        }
        let result = (|| {
            let (_, exported) = self
                .instance
                .get_export(&mut *self.store, None, instance)
                .ok_or_else(|| wasmtime::format_err!("no export `{instance}`"))?;
            let (_, index) = self
                .instance
                .get_export(&mut *self.store, Some(&exported), func)
                .ok_or_else(|| wasmtime::format_err!("no export `{instance}#{func}`"))?;
            let func = self.instance.get_typed_func::<(), (R,)>(&mut *self.store, index)?;
            func.call(&mut *self.store, ()).map(|(r,)| r)
        })();
        result.map_err(|e| self.error = Some(e)).ok()
    }
}

impl wasmtime_wizer::ComponentInstanceState for Access<'_> {
    async fn call_func_ret_list_u8(&mut self, instance: &str, func: &str, contents: impl FnOnce(&[u8]) + Send) {
        self.after_memory = true;
        let first_global = self.first_global;
        let Some(list) = self.call::<WasmList<u8>>(instance, func) else { return contents(&[]) };
        let memory = list.as_le_slice(&*self.store);
        // The stack pointer back where it started: everything below it is dead frames.
        match self.stack_top.filter(|&top| first_global == Some(top as i32) && top as usize <= memory.len()) {
            Some(top) => {
                let mut memory = memory.to_vec();
                memory[..top as usize].fill(0);
                contents(&memory)
            }
            None => contents(memory),
        }
    }

    async fn call_func_ret_s32(&mut self, instance: &str, func: &str) -> i32 {
        let value = self.call(instance, func).unwrap_or_default();
        if std::mem::take(&mut self.after_memory) || self.first_global.is_none() {
            self.first_global = Some(value);
        }
        value
    }

    async fn call_func_ret_s64(&mut self, instance: &str, func: &str) -> i64 {
        self.call(instance, func).unwrap_or_default()
    }

    async fn call_func_ret_f32(&mut self, instance: &str, func: &str) -> u32 {
        self.call::<f32>(instance, func).unwrap_or_default().to_bits()
    }

    async fn call_func_ret_f64(&mut self, instance: &str, func: &str) -> u64 {
        self.call::<f64>(instance, func).unwrap_or_default().to_bits()
    }
}

#[cfg(test)]
mod tests {
    use super::stack_top;

    fn component(modules: &[&str]) -> Vec<u8> {
        let body: String = modules
            .iter()
            .enumerate()
            .map(|(i, m)| format!("(core module $m{i} {m}) (core instance (instantiate $m{i}))"))
            .collect();
        wat::parse_str(format!("(component {body})")).unwrap()
    }

    /// Only a stack laid out below all data (LLVM's `--stack-first`), with the stack pointer
    /// as the first global, is zeroed below the stack pointer: any other layout may hold live
    /// statics there.
    #[test]
    fn the_dead_stack_is_found_only_in_a_stack_first_layout() {
        let stack_first = r#"(memory 2) (global (mut i32) (i32.const 65536)) (data (i32.const 65536) "x")"#;
        assert_eq!(stack_top(&component(&[stack_first])), Some(65536));
        assert_eq!(stack_top(&component(&[stack_first, "(func)"])), Some(65536), "a shim without state");
        // Data below the stack pointer: the statics come first.
        let data_first = r#"(memory 2) (global (mut i32) (i32.const 65536)) (data (i32.const 1024) "x")"#;
        assert_eq!(stack_top(&component(&[data_first])), None);
        // No data at all: nothing says where the statics are.
        assert_eq!(stack_top(&component(&["(memory 2) (global (mut i32) (i32.const 65536))"])), None);
        // The first global not a mutable i32.
        let immutable = r#"(memory 2) (global i32 (i32.const 65536)) (data (i32.const 65536) "x")"#;
        assert_eq!(stack_top(&component(&[immutable])), None);
        // Another module with mutable globals: which global is the stack pointer is unclear.
        assert_eq!(stack_top(&component(&[stack_first, "(global (mut i32) (i32.const 0))"])), None);
        // Two memories.
        assert_eq!(stack_top(&component(&[stack_first, "(memory 1)"])), None);
        // Not a component at all.
        assert_eq!(stack_top(b"not wasm"), None);
    }
}
