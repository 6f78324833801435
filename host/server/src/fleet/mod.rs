//! A fleet of sidecars sharing desired state through NATS JetStream.
//!
//! Desired state (which module each policy runs, data documents, shadows, routes, issuers and
//! keys, revocations) lives in one KV bucket per fleet, `sandgate_<fleet>`, one key per item
//! ([`desired`]); the bucket's revision is the fleet's version. Modules uploaded rather than
//! pulled from a registry are in the object store `sandgate_<fleet>_modules`, by digest. Each
//! sidecar:
//!
//! 1. at start applies the state it last applied, from its local cache file, so it starts
//!    while NATS is down (modules come from the module cache);
//! 2. watches the bucket from the revision after that one (with nothing cached: the last value
//!    of every key) and, each time the watch has delivered everything pending, applies the
//!    result as one new snapshot that is exactly the bucket's content at its last revision
//!    ([`apply`]), so no check ever decides on a mix of two revisions, and every decision-log
//!    line names its revision;
//! 3. reports node id, applied revision, loaded modules, errors and a heartbeat in the status
//!    bucket `sandgate_<fleet>_status` ([`status`]), which `sandgate fleet … --wait` watches to
//!    return once every live sidecar has applied a write;
//! 4. counts how long since NATS last showed it current (nothing in the bucket it has not
//!    applied): past `max_staleness_secs` it is not ready, and (by default) answers checks 503
//!    `stale_state`.
//!
//! A module that fails to pull, compile or probe, or a data document that is not JSON, keeps
//! the previous version of that item serving and is reported in the status; the revision is
//! still applied (every other item of it is live). A module that failed is tried again in the
//! background, after 1 s and then twice as long each time up to 5 minutes, and applied once it
//! resolves.

pub mod apply;
pub use apply::Phase;
pub mod desired;
pub mod status;

use crate::config::FleetConfig;
use crate::state::State;
use desired::{DesiredState, Key};
use futures_util::StreamExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use apply::ItemError;

/// The bucket holding fleet `name`'s desired state.
pub fn bucket(name: &str) -> String {
    format!("sandgate_{name}")
}

/// The bucket holding fleet `name`'s sidecar statuses.
pub fn status_bucket(name: &str) -> String {
    format!("sandgate_{name}_status")
}

/// How long a status entry lives without a heartbeat; `--wait` counts a sidecar as live while
/// its entry is younger than three heartbeats.
pub const STATUS_MAX_AGE: Duration = Duration::from_secs(60);

/// What a sidecar knows of its place in the fleet: what it applied, and how long it has been
/// out of touch.
pub struct FleetHealth {
    /// The fleet's name.
    pub name: String,
    /// This sidecar's node id.
    pub node_id: String,
    /// How often the status is written.
    pub heartbeat_every: Duration,
    max_staleness: Duration,
    deny_when_stale: bool,
    /// When the watch last showed this sidecar current with the bucket (or delivered a change).
    last_contact: Mutex<std::time::Instant>,
    synced: AtomicBool,
    /// Whether the bucket's watch is established now.
    watching: AtomicBool,
    applied: AtomicU64,
    errors: Mutex<Vec<ItemError>>,
    /// Items that could not be applied, by key: (revision, error).
    failed: Mutex<std::collections::HashMap<String, (u64, String)>>,
    /// The status bucket, opened on first use; held while a status is written.
    status_store: tokio::sync::Mutex<Option<async_nats::jetstream::kv::Store>>,
    /// The routes of this sidecar's configuration, tried after the fleet's.
    pub(crate) local_routes: Arc<[crate::snapshot::Route]>,
    /// The issuers of this sidecar's configuration, with their static keys.
    pub(crate) local_issuers: std::collections::HashMap<String, Arc<sandgate_auth::Issuer>>,
    /// The `issuer.*`/`keys.*` items (key, revision) the key sets were last built from, and
    /// their errors.
    #[allow(clippy::type_complexity)]
    pub(crate) keys_applied: Mutex<Option<(Vec<(String, u64)>, Vec<ItemError>)>>,
    /// Modules resolved from the references the fleet names, while it names them.
    resolved: Mutex<std::collections::HashMap<String, apply::Resolved>>,
    /// Set when the bucket was found reset: the next apply parses every data item again
    /// rather than keep a document whose revision number matches.
    pub(crate) reparse_data: AtomicBool,
    /// Set when the apply at start had errors: the state is applied again once NATS is
    /// reached.
    retry_start: AtomicBool,
    /// Servers of a cluster that keep the status bucket, when this sidecar creates it.
    pub(crate) replicas: usize,
    /// The NATS client, once the fleet watch has one (for the object store).
    pub(crate) client: std::sync::OnceLock<async_nats::Client>,
}

impl FleetHealth {
    /// Health for `config`, counting staleness from now; `routes` and `issuers` are the
    /// sidecar's own, which the fleet's come beside.
    pub fn new(
        config: &FleetConfig,
        routes: Arc<[crate::snapshot::Route]>,
        issuers: std::collections::HashMap<String, Arc<sandgate_auth::Issuer>>,
    ) -> Self {
        FleetHealth {
            name: config.name.clone(),
            node_id: config.node_id.clone().unwrap_or_else(hostname),
            heartbeat_every: Duration::from_millis(config.heartbeat_ms.max(100)),
            max_staleness: Duration::from_secs(config.max_staleness_secs),
            deny_when_stale: config.when_stale == crate::config::WhenStale::Deny,
            last_contact: Mutex::new(std::time::Instant::now()),
            synced: AtomicBool::new(false),
            watching: AtomicBool::new(false),
            applied: AtomicU64::new(0),
            errors: Mutex::new(Vec::new()),
            failed: Mutex::new(std::collections::HashMap::new()),
            status_store: tokio::sync::Mutex::new(None),
            local_routes: routes,
            local_issuers: issuers,
            keys_applied: Mutex::new(None),
            resolved: Mutex::new(std::collections::HashMap::new()),
            reparse_data: AtomicBool::new(false),
            retry_start: AtomicBool::new(false),
            client: std::sync::OnceLock::new(),
            replicas: config.replicas,
        }
    }

    /// Forget everything remembered by revision number (failed items, the key sets'
    /// fingerprint, data documents): the bucket was reset and its numbers start again.
    fn forget_revisions(&self) {
        self.failed.lock().unwrap_or_else(|e| e.into_inner()).clear();
        *self.keys_applied.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.reparse_data.store(true, Ordering::Release);
    }

    pub(crate) fn resolved(&self, reference: &str) -> Option<apply::Resolved> {
        self.resolved.lock().unwrap_or_else(|e| e.into_inner()).get(reference).cloned()
    }

    pub(crate) fn remember_resolved(&self, reference: &str, resolved: apply::Resolved) {
        self.resolved.lock().unwrap_or_else(|e| e.into_inner()).insert(reference.to_owned(), resolved);
    }

    /// Forget the modules of references the fleet no longer names.
    pub(crate) fn keep_resolved(&self, referenced: &std::collections::HashSet<String>) {
        self.resolved.lock().unwrap_or_else(|e| e.into_inner()).retain(|r, _| referenced.contains(r));
    }

    /// The watch showed this sidecar current with the bucket just now. Only the watch
    /// counts: a sidecar that can write its status but not follow the bucket is not fresh.
    pub fn contact(&self) {
        *self.last_contact.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
    }

    /// Time since the watch last showed this sidecar current (monotonic: a clock step changes
    /// nothing).
    pub fn staleness(&self) -> Duration {
        self.last_contact.lock().unwrap_or_else(|e| e.into_inner()).elapsed()
    }

    /// Out of touch for longer than `max_staleness_secs`.
    pub fn is_stale(&self) -> bool {
        self.staleness() > self.max_staleness
    }

    /// Whether checks are to be denied now (stale, and configured to deny then).
    pub fn deny_checks(&self) -> bool {
        self.deny_when_stale && self.is_stale()
    }

    /// Whether the sidecar has caught up with the bucket since it started.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// The revision last applied.
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }

    /// The error of item `key` as written at `revision`, if it failed before.
    pub(crate) fn failed_item(&self, key: &str, revision: u64) -> Option<String> {
        let failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        failed.get(key).filter(|(r, _)| *r == revision).map(|(_, e)| e.clone())
    }

    pub(crate) fn remember_failure(&self, key: &str, revision: u64, error: &str) {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        failed.insert(key.to_owned(), (revision, error.to_owned()));
    }

    /// The revision applied, with the errors of that same revision (read together).
    pub fn applied_with_errors(&self) -> (u64, Vec<ItemError>) {
        let errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        (self.applied.load(Ordering::Relaxed), errors.clone())
    }

    fn applied_now(&self, revision: u64, errors: Vec<ItemError>) {
        let mut held = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        *held = errors;
        self.applied.store(revision, Ordering::Relaxed);
    }
}

/// This machine's host name, as a KV key (`[A-Za-z0-9_-]`, others replaced by `-`).
pub(crate) fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "sidecar".into());
    sanitize(name.trim())
}

/// `text` with every byte outside `[A-Za-z0-9_-]` replaced by `-`.
pub fn sanitize(text: &str) -> String {
    text.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '-' }).collect()
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Why NATS could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// A credentials or CA file.
    #[error("[fleet]: cannot read `{}`", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    /// The client could not be set up.
    #[error("[fleet]: {0}")]
    Setup(String),
    /// NATS or JetStream failed.
    #[error("NATS: {0}")]
    Nats(String),
}

/// A NATS client for `config`. It connects in the background and reconnects by itself; this
/// returns at once, so a sidecar starts while NATS is down.
pub async fn connect(config: &FleetConfig, wait: bool) -> Result<async_nats::Client, FleetError> {
    let first_line = |path: &PathBuf| -> Result<String, FleetError> {
        let text = std::fs::read_to_string(path).map_err(|e| FleetError::Read(path.clone(), e))?;
        Ok(text.lines().next().unwrap_or_default().trim().to_owned())
    };
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("sandgate/{}", config.node_id.as_deref().unwrap_or("cli")))
        .request_timeout(Some(Duration::from_secs(5)))
        .connection_timeout(Duration::from_secs(5));
    if !wait {
        options = options.retry_on_initial_connect();
    }
    if let Some(user) = &config.user {
        let password = match (&config.password, &config.password_file) {
            (Some(p), _) => p.clone(),
            (None, Some(path)) => first_line(path)?,
            (None, None) => String::new(),
        };
        options = options.user_and_password(user.clone(), password);
    }
    let token = match (&config.token, &config.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(path)) => Some(first_line(path)?),
        (None, None) => None,
    };
    if let Some(token) = token {
        options = options.token(token);
    }
    if let Some(path) = &config.nkey_seed_file {
        options = options.nkey(first_line(path)?);
    }
    if let Some(path) = &config.ca_file {
        options = options.add_root_certificates(path.clone()).require_tls(true);
    } else if config.tls {
        options = options.require_tls(true);
    }
    let servers = config
        .url
        .split(',')
        .map(|url| url.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| FleetError::Setup(format!("`{}` is not a list of NATS URLs: {e}", config.url)))?;
    options.connect(servers).await.map_err(|e| FleetError::Nats(format!("cannot connect to `{}`: {e}", config.url)))
}

/// Open the KV bucket `name`, creating it (with `history` values per key, entries living
/// `max_age`, zero: forever, kept on `replicas` servers of a cluster) if it does not exist. The bucket's stream is created here with the
/// KV conventions rather than by `create_key_value`, which needs a NATS server newer than
/// 2.10 for its account query; the bucket is the same.
pub async fn open_or_create_bucket(
    js: &async_nats::jetstream::Context,
    name: &str,
    history: i64,
    max_age: Duration,
    storage: async_nats::jetstream::stream::StorageType,
    replicas: usize,
) -> Result<async_nats::jetstream::kv::Store, FleetError> {
    if let Ok(store) = js.get_key_value(name).await {
        return Ok(store);
    }
    let config = async_nats::jetstream::stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: history,
        max_age,
        storage,
        num_replicas: replicas.max(1),
        discard: async_nats::jetstream::stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        ..Default::default()
    };
    if let Err(e) = js.get_or_create_stream(config).await {
        return Err(FleetError::Nats(format!("cannot create the bucket `{name}`: {e}")));
    }
    js.get_key_value(name).await.map_err(|e| FleetError::Nats(format!("cannot open the bucket `{name}`: {e}")))
}

/// The state this sidecar last applied, from `path` (empty when there is none yet).
pub fn load_cached(path: &std::path::Path) -> DesiredState {
    use std::io::Read;
    let read = std::fs::File::open(path).and_then(|file| {
        let mut bytes = Vec::new();
        file.take(256 << 20).read_to_end(&mut bytes).map(|_| bytes)
    });
    match read {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "the fleet cache is not readable; starting empty");
            DesiredState::default()
        }),
        Err(_) => DesiredState::default(),
    }
}

fn save_cached(path: &std::path::Path, desired: &DesiredState) {
    let written = serde_json::to_vec(desired)
        .map_err(std::io::Error::other)
        .and_then(|bytes| sandgate_registry::write_atomically(path, &bytes));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "cannot write the fleet cache");
    }
}

/// Apply `desired` now (at start, before anything is served) and record it.
pub async fn apply_initial(state: &State, health: &FleetHealth, desired: &DesiredState) {
    let errors = state.apply_desired(desired, crate::decide::unix_now(), Phase::Start).await;
    health.retry_start.store(!errors.is_empty(), Ordering::Release);
    report_errors(&errors);
    health.applied_now(desired.revision, errors);
}

fn report_errors(errors: &[ItemError]) {
    for e in errors {
        tracing::warn!(key = %e.key, revision = e.revision, error = %e.error, "fleet item not applied; the previous version keeps serving");
    }
}

/// Watch the fleet's bucket and apply every change, until `stop`; reconnects and resumes from
/// the last applied revision on any failure. Also publishes this sidecar's status.
pub async fn run(
    state: Arc<State>,
    config: FleetConfig,
    cache_file: PathBuf,
    mut desired: DesiredState,
    stop: CancellationToken,
) {
    let Some(health) = state.fleet.clone() else { return };
    let client = match connect(&config, false).await {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %sandgate_auth::error_chain(&e), "the fleet client cannot start; serving the cached state");
            return;
        }
    };
    let _ = health.client.set(client.clone());
    let heartbeat =
        tokio::spawn(status::heartbeat(state.clone(), client.clone(), health.heartbeat_every, stop.clone()));
    let mut failing = false;
    let mut retry = Retry::default();
    let mut tries = ConsumerTries::default();
    loop {
        let result =
            watch(&state, &health, &client, &cache_file, &mut desired, &stop, &mut failing, &mut retry, &mut tries)
                .await;
        health.watching.store(false, Ordering::Relaxed);
        health.synced.store(false, Ordering::Relaxed);
        if stop.is_cancelled() {
            break;
        }
        if let Err(e) = result {
            if !failing {
                tracing::warn!(error = %e, revision = desired.revision, "fleet watch interrupted; resuming from the last applied revision");
            }
            failing = true;
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
    if let Some(task) = retry.task.take() {
        task.abort();
    }
    let _ = heartbeat.await;
}

/// How long the watch may deliver nothing while NATS says the bucket is ahead before it is
/// made anew.
const STUCK_WATCH: Duration = Duration::from_secs(3);

/// How long one try at creating a consumer (a watch) may take, growing after each try that
/// takes longer. A cluster that lost a node can place a new consumer on the lost node and
/// never answer; the client would wait out its whole request timeout (5 s) before trying
/// again, where a consumer is normally created within milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct ConsumerTries {
    limit: Duration,
}

impl ConsumerTries {
    const FIRST: Duration = Duration::from_millis(750);
    const MAX: Duration = Duration::from_secs(6);

    /// Run one try of `create`: its result, or `None` if it took longer than this try may (the
    /// next one may take twice as long, up to [`ConsumerTries::MAX`]).
    pub async fn attempt<T>(&mut self, create: impl std::future::Future<Output = T>) -> Option<T> {
        match tokio::time::timeout(self.limit, create).await {
            Ok(result) => {
                *self = ConsumerTries::default();
                Some(result)
            }
            Err(_) => {
                self.timed_out();
                None
            }
        }
    }

    /// A try took longer than it could: the next may take twice as long.
    fn timed_out(&mut self) {
        self.limit = (self.limit * 2).min(Self::MAX);
    }
}

impl Default for ConsumerTries {
    fn default() -> Self {
        ConsumerTries { limit: Self::FIRST }
    }
}

/// The first wait before the modules of failed items are tried again, and the longest: the
/// wait doubles after each try that leaves one failing.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// Trying again, off the watch, the modules of items that failed (a registry or the object
/// store out of reach, a tag not yet pushed): a sidecar started or written to during an outage
/// catches up by itself when it ends, without the item being written again.
struct Retry {
    /// The try under way: how many modules it resolved.
    task: Option<tokio::task::JoinHandle<usize>>,
    /// When the next try is due, once an item is failing.
    due: Option<tokio::time::Instant>,
    /// The wait after the next try.
    backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry { task: None, due: None, backoff: RETRY_FIRST }
    }
}

impl Retry {
    /// Start a try if one is due: the modules of the `policy.*` and `shadow.*` items that
    /// failed in the last apply, as `desired` holds them now.
    fn start_if_due(&mut self, state: &Arc<State>, health: &FleetHealth, desired: &DesiredState) {
        if self.task.is_some() {
            return;
        }
        let (_, errors) = health.applied_with_errors();
        let failed: Vec<(String, String)> = errors
            .iter()
            .filter(|e| matches!(Key::parse(&e.key), Some(Key::Policy(_) | Key::Shadow(_))))
            .filter_map(|e| {
                let (value, revision) = desired.items.get(&e.key)?;
                (*revision == e.revision).then(|| (e.key.clone(), value.clone()))
            })
            .collect();
        if failed.is_empty() {
            *self = Retry::default();
            return;
        }
        let now = tokio::time::Instant::now();
        if *self.due.get_or_insert(now + self.backoff) > now {
            return;
        }
        let state = state.clone();
        self.task = Some(tokio::spawn(async move { state.retry_modules(&failed).await }));
    }

    /// The try under way has ended: the next one waits twice as long.
    fn ended(&mut self) {
        self.task = None;
        self.due = Some(tokio::time::Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
    }
}

#[allow(clippy::too_many_arguments)]
async fn watch(
    state: &Arc<State>,
    health: &FleetHealth,
    client: &async_nats::Client,
    cache_file: &std::path::Path,
    desired: &mut DesiredState,
    stop: &CancellationToken,
    failing: &mut bool,
    retry: &mut Retry,
    tries: &mut ConsumerTries,
) -> Result<(), FleetError> {
    let nats = |e: &dyn std::fmt::Display| FleetError::Nats(e.to_string());
    let js = async_nats::jetstream::new(client.clone());
    let kv = js.get_key_value(bucket(&health.name)).await.map_err(|e| nats(&e))?;
    let (last, created) =
        bucket_state(&js, &health.name).await.ok_or_else(|| FleetError::Nats("cannot read the bucket".into()))?;
    // The bucket is not the one this sidecar applied (deleted and made again, new NATS
    // storage): its revisions mean something else now, even where the new one has already
    // passed the old revision. Start over from it.
    let other_bucket = desired.bucket.as_ref().is_some_and(|b| *b != created);
    let reset = last < desired.revision || other_bucket;
    if reset {
        tracing::warn!(cached = desired.revision, bucket = last, "the fleet bucket was reset; reading it whole");
        *desired = DesiredState::default();
        health.forget_revisions();
    }
    // A state cached without its bucket's identity is saved with it at once.
    let mut save = desired.bucket.is_none();
    desired.bucket = Some(created);
    // NATS is reached: what could not be applied at start (a module only NATS or a registry
    // has, neither reachable then) is tried again, whether or not the bucket has anything new.
    // And a bucket found reset and empty delivers nothing to apply: what only the old one had
    // goes now.
    let start_failed = health.retry_start.swap(false, Ordering::AcqRel);
    if (start_failed && desired.revision > 0) || (reset && last == 0) {
        let errors = state.apply_desired(desired, crate::decide::unix_now(), Phase::Live).await;
        report_errors(&errors);
        health.applied_now(desired.revision, errors);
        save = true;
    }
    if save {
        save_cached(cache_file, desired);
    }
    // From a revision: every change since, in order. From nothing: the current value of
    // every key (not the history).
    let create = async {
        if desired.revision == 0 {
            kv.watch_with_history(">").await
        } else {
            kv.watch_all_from_revision(desired.revision + 1).await
        }
    };
    let mut updates = tries
        .attempt(create)
        .await
        .ok_or_else(|| FleetError::Nats("the watch's consumer was not created in time".into()))?
        .map_err(|e| nats(&e))?;
    health.watching.store(true, Ordering::Relaxed);
    if *failing {
        tracing::info!(revision = desired.revision, "fleet watch resumed");
        *failing = false;
    }
    if last <= desired.revision {
        health.contact();
        health.synced.store(true, Ordering::Relaxed);
    }
    // Reading the current value of every key: they come in key order, not revision order.
    let mut initial = desired.revision == 0;
    // The watch has delivered part of a batch and not yet the rest: `desired` is then not the
    // bucket at any revision (when read whole, a key-ordered part of it), and nothing may be
    // applied from it until the batch ends.
    let mut mid_batch = initial;
    let mut next_expiry = next_expiry(desired, crate::decide::unix_now());
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    // Since when NATS has answered that the bucket is ahead while the watch delivered nothing.
    let mut behind_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {
                // Fresh only while NATS answers that the bucket has nothing this sidecar has not
                // applied (asked now: `Store::status` would answer from a cache).
                let state_now = tokio::time::timeout(Duration::from_secs(1), bucket_state(&js, &health.name)).await;
                // A bucket made again while this watch was open (NATS lost its storage; the
                // watch's consumer re-creates itself on the new stream from the old sequence):
                // the watch is made anew, which reads the new bucket whole.
                if let Ok(Some((_, created))) = &state_now
                    && desired.bucket.as_ref().is_some_and(|b| b != created)
                {
                    return Err(FleetError::Nats("the fleet bucket was made again".into()));
                }
                let last = state_now.map(|s| s.map(|(last, _)| last));
                match last {
                    Ok(Some(last)) if last <= desired.revision => {
                        health.contact();
                        behind_since = None;
                    }
                    // A watch whose consumer was lost with a NATS node (or whose client missed
                    // its heartbeats) can stay silent without ending: the bucket moves on and
                    // nothing arrives. Past a few seconds of that, it is made anew from the last
                    // applied revision.
                    Ok(Some(last)) => {
                        let since = *behind_since.get_or_insert_with(tokio::time::Instant::now);
                        if since.elapsed() >= STUCK_WATCH {
                            return Err(FleetError::Nats(format!(
                                "the watch delivered nothing for {} s while the bucket is at revision {last} and this sidecar at {}",
                                STUCK_WATCH.as_secs(),
                                desired.revision
                            )));
                        }
                    }
                    _ => {}
                }
                // A revocation that expired is dropped from the snapshot (same revision).
                let now = crate::decide::unix_now();
                if !mid_batch && next_expiry.is_some_and(|t| t <= now) {
                    let errors = state.apply_desired(desired, now, Phase::Live).await;
                    health.applied_now(desired.revision, errors);
                    next_expiry = self::next_expiry(desired, now);
                }
                retry.start_if_due(state, health, desired);
            }
            resolved = async {
                match retry.task.as_mut() {
                    Some(task) => task.await,
                    None => std::future::pending().await,
                }
            }, if retry.task.is_some() => {
                retry.ended();
                // What resolved is taken by this apply; what still fails keeps its version. In
                // the middle of a batch, the batch's own apply takes it when the batch ends.
                if resolved.unwrap_or(0) > 0 && !mid_batch {
                    let errors = state.apply_desired(desired, crate::decide::unix_now(), Phase::Live).await;
                    report_errors(&errors);
                    health.applied_now(desired.revision, errors);
                    let _ = tokio::time::timeout(Duration::from_secs(5), status::publish(state, client)).await;
                }
            }
            entry = updates.next() => {
                let entry = match entry {
                    None => return Err(FleetError::Nats("the watch ended".into())),
                    Some(Err(e)) => return Err(nats(&e)),
                    Some(Ok(entry)) => entry,
                };
                behind_since = None;
                mid_batch = entry.delta > 0;
                if initial || entry.revision > desired.revision {
                    match entry.operation {
                        async_nats::jetstream::kv::Operation::Put => desired.put(entry.key.clone(), &entry.value, entry.revision),
                        _ => desired.delete(&entry.key, entry.revision),
                    }
                }
                // Apply once the watch has delivered everything pending: the snapshot is then
                // exactly the bucket at `desired.revision` (an earlier cut could hold a key at a
                // value whose successors were already pruned from the history).
                if entry.delta == 0 {
                    initial = false;
                    let now = crate::decide::unix_now();
                    let errors = state.apply_desired(desired, now, Phase::Live).await;
                    report_errors(&errors);
                    health.applied_now(desired.revision, errors);
                    health.contact();
                    health.synced.store(true, Ordering::Relaxed);
                    save_cached(cache_file, desired);
                    next_expiry = self::next_expiry(desired, now);
                    // Bounded: a status write meeting an election must not hold the watch (the
                    // heartbeat writes it again).
                    let _ = tokio::time::timeout(Duration::from_secs(5), status::publish(state, client)).await;
                }
            }
        }
    }
}

/// The object store holding the fleet's uploaded modules and its data documents, by digest.
pub fn objects_bucket(fleet: &str) -> String {
    format!("sandgate_{fleet}_modules")
}

/// Object `digest` (`sha256:<hex>`: a module or a data document) from the fleet's object store:
/// at most `limit` bytes, and only if its content has that digest.
pub async fn fetch_object(
    client: &async_nats::Client,
    fleet: &str,
    digest: &str,
    limit: u64,
) -> Result<Vec<u8>, String> {
    use tokio::io::AsyncReadExt;
    let js = async_nats::jetstream::new(client.clone());
    let store = js
        .get_object_store(objects_bucket(fleet))
        .await
        .map_err(|e| format!("the fleet's object store `{}`: {e}", objects_bucket(fleet)))?;
    let object = store.get(digest).await.map_err(|e| format!("{digest} in the fleet's object store: {e}"))?;
    if object.info.size as u64 > limit {
        return Err(format!("{digest} is {} bytes, over the {limit}-byte limit", object.info.size));
    }
    let mut bytes = Vec::new();
    object
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| format!("reading {digest} from the fleet's object store: {e}"))?;
    if bytes.len() as u64 > limit {
        return Err(format!("{digest} is over the {limit}-byte limit"));
    }
    if sandgate_registry::sha256_digest(&bytes) != digest {
        return Err(format!("the object stored as {digest} does not have that digest"));
    }
    Ok(bytes)
}

/// The fleet bucket's last revision, asked of NATS now (`None` if it does not answer).
pub async fn last_revision(js: &async_nats::jetstream::Context, fleet: &str) -> Option<u64> {
    bucket_state(js, fleet).await.map(|(last, _)| last)
}

/// The bucket's last revision and its identity (its stream's creation time, in nanoseconds).
async fn bucket_state(js: &async_nats::jetstream::Context, fleet: &str) -> Option<(u64, String)> {
    let mut stream = js.get_stream(format!("KV_{}", bucket(fleet))).await.ok()?;
    let info = stream.info().await.ok()?;
    Some((info.state.last_sequence, info.created.unix_timestamp_nanos().to_string()))
}

/// The earliest `until` of a revocation still in force at `now`.
fn next_expiry(desired: &DesiredState, now: u64) -> Option<u64> {
    desired
        .items
        .iter()
        .filter(|(key, _)| matches!(Key::parse(key), Some(Key::RevokedJti(_) | Key::RevokedSubject(_))))
        .filter_map(|(_, (value, _))| serde_json::from_str::<desired::RevocationItem>(value).ok()?.until)
        .filter(|until| *until > now)
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_consumer_try_that_gets_no_answer_ends_at_its_limit_and_the_next_may_take_longer() {
        let mut tries = ConsumerTries::default();
        // A consumer placed on a lost node: its creation is never answered.
        assert_eq!(tries.attempt(std::future::pending::<()>()).await, None);
        assert_eq!(tries.limit, ConsumerTries::FIRST * 2);
        assert_eq!(tries.attempt(std::future::pending::<()>()).await, None);
        assert_eq!(tries.limit, ConsumerTries::FIRST * 4);
        // An answer, even an error, is passed on, and the next try starts from the first limit.
        assert_eq!(tries.attempt(async { Err::<(), _>("no responders") }).await, Some(Err("no responders")));
        assert_eq!(tries.limit, ConsumerTries::FIRST);
        // Never past the most a try may take.
        let mut slow = ConsumerTries { limit: ConsumerTries::MAX - Duration::from_millis(1) };
        slow.timed_out();
        assert_eq!(slow.limit, ConsumerTries::MAX);
        slow.timed_out();
        assert_eq!(slow.limit, ConsumerTries::MAX);
    }
}
