//! The sidecar as one value: built from a [`Config`] (state loaded, listeners bound), then run
//! until a shutdown signal, then drained. It owns every background task: the listeners, the
//! JWKS refresh loops, the policy-directory watcher, shadow evaluations and the decision-log
//! writer; the runtime owns its epoch thread and the state its compiler thread.

use crate::admin_api::AdminApi;
use crate::config::SinkKind;
use crate::config::{AdminConfig, Config, ProxyKind};
use crate::decide::Authorizer;
use crate::decision_log::{DecisionLog, LogWriter};
use crate::forward_auth::ForwardAuth;
use crate::listener::{self, Listener};
use crate::log_sink::{RotatingFile, Spool, SpoolWriter};
use crate::state::{StartError, State};
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A sidecar ready to run.
pub struct Sidecar {
    config: Config,
    proxy: ProxyKind,
    authorizer: Authorizer,
    http: Listener,
    ops: Option<Listener>,
    grpc: Option<Listener>,
    admin: Option<(Listener, Option<String>)>,
    generated_admin_token: Option<PathBuf>,
    log_writer: LogWriter,
    tasks: TaskTracker,
    stop: CancellationToken,
    /// In a fleet: the state applied at start (from the local cache), to watch on from.
    fleet_start: Option<crate::fleet::desired::DesiredState>,
    /// With `sink = "nats"`: the spool decision records wait in.
    spool: Option<Arc<Spool>>,
    /// With `[tracing]`: the span exporter, flushed at shutdown.
    tracing: Option<Arc<crate::otel::Tracing>>,
}

impl Sidecar {
    /// Load the state `config` describes and bind its listeners; nothing is served yet.
    pub async fn build(config: Config) -> Result<Sidecar, StartError> {
        config.check()?;
        let open_files = raise_open_files_limit();
        // Every listener may hold `max_connections`; the rest (spool segments, registry and NATS
        // clients, modules being read) fits in 512.
        let listeners = 1 + [config.grpc.is_some(), config.admin.is_some(), config.server.ops_listen.is_some()]
            .into_iter()
            .filter(|on| *on)
            .count() as u64;
        let wanted = listeners * config.server.max_connections as u64 + 512;
        if open_files < wanted {
            tracing::warn!(
                open_files,
                wanted,
                max_connections = config.server.max_connections,
                "the process may open fewer files than its listeners may hold connections: past the limit, \
                 connections wait to be accepted; raise the hard limit (`ulimit -Hn`, LimitNOFILE=)"
            );
        }
        let proxy = config.server.proxy.ok_or_else(|| StartError::Admin("[server] proxy is not set".into()))?;
        let state = State::from_config(&config).await?;
        // A fleet member starts from the state it last applied, so it serves while NATS is down.
        let fleet_start = match (&config.fleet, &state.fleet) {
            (Some(fleet), Some(health)) => {
                let desired = crate::fleet::load_cached(&fleet.cache_file());
                crate::fleet::apply_initial(&state, health, &desired).await;
                if desired.revision > 0 {
                    tracing::info!(fleet = %fleet.name, revision = desired.revision, "started from the cached fleet state");
                }
                Some(desired)
            }
            _ => None,
        };
        let tasks = TaskTracker::new();
        let dropped = state.metrics.decision_log_dropped.clone();
        let records = &config.decision_log;
        let mut spool = None;
        let sink: Box<dyn std::io::Write + Send> = match records.sink {
            SinkKind::Stdout => Box::new(std::io::stdout()),
            SinkKind::File => {
                let path = records.path.clone().unwrap_or_default();
                let file = RotatingFile::open(path.clone(), records.max_file_mib << 20, records.max_files)
                    .map_err(|e| StartError::Listen(format!("[decision_log] cannot open `{}`", path.display()), e))?;
                Box::new(file)
            }
            SinkKind::Nats => {
                let nats =
                    records.nats.as_ref().ok_or_else(|| StartError::Admin("[decision_log.nats] is missing".into()))?;
                let dir = nats.spool_dir.clone().unwrap_or_else(|| {
                    crate::config::cache_home().unwrap_or_else(|| PathBuf::from(".")).join("sandgate").join("spool")
                });
                let opened = Spool::open(
                    dir.clone(),
                    nats.spool_max_mib << 20,
                    Duration::from_millis(nats.spool_sync_ms),
                    dropped.clone(),
                )
                .map_err(|e| {
                    StartError::Listen(format!("[decision_log.nats] cannot open the spool `{}`", dir.display()), e)
                })?;
                spool = Some(opened.clone());
                Box::new(SpoolWriter(opened))
            }
        };
        let (log, log_writer) = DecisionLog::start(sink, (records.queue_mib as usize) << 20, dropped)
            .map_err(|e| StartError::Listen("cannot start the decision-log writer".into(), e))?;
        let server = &config.server;
        let mut authorizer =
            Authorizer::new(state, server.identity_headers.clone(), server.token_cache_size, log, tasks.clone())
                .with_capture(records.capture, records.redact_headers.clone());
        let tracing = match &config.tracing {
            Some(settings) => {
                let tracing = Arc::new(crate::otel::Tracing::start(settings).map_err(StartError::Admin)?);
                authorizer = authorizer.with_tracing(tracing.clone());
                Some(tracing)
            }
            None => None,
        };
        let http = bind_tcp(&server.listen, "").await?;
        warn_beyond_loopback(&http, "forward-auth");
        let ops = match &server.ops_listen {
            Some(address) => Some(bind_tcp(address, " (health and metrics)").await?),
            None => None,
        };
        let grpc = match &config.grpc {
            Some(grpc) => Some(bind_tcp(&grpc.listen, " (gRPC)").await?),
            None => None,
        };
        if let Some(grpc) = &grpc {
            warn_beyond_loopback(grpc, "grpc");
        }
        let (admin, generated_admin_token) = match &config.admin {
            Some(admin) => {
                let (listener, token, generated) = bind_admin(admin).await?;
                (Some((listener, token)), generated)
            }
            None => (None, None),
        };
        Ok(Sidecar {
            config,
            proxy,
            authorizer,
            http,
            ops,
            grpc,
            admin,
            generated_admin_token,
            log_writer,
            tasks,
            stop: CancellationToken::new(),
            fleet_start,
            spool,
            tracing,
        })
    }

    /// Evaluate policies with `native` instead of in Wasm: the load benchmark's baseline.
    #[cfg(feature = "bench-internals")]
    pub fn with_native_baseline(mut self, native: crate::decide::NativePolicy) -> Self {
        self.authorizer = self.authorizer.with_native_baseline(native);
        self
    }

    /// Where forward-auth checks are answered.
    pub fn http_address(&self) -> String {
        self.http.address()
    }

    /// Where `/healthz`, `/readyz` and `/metrics` are answered when they have a listener of
    /// their own.
    pub fn ops_address(&self) -> Option<String> {
        self.ops.as_ref().map(Listener::address)
    }

    /// Where Envoy ext_authz gRPC is answered, if configured.
    pub fn grpc_address(&self) -> Option<String> {
        self.grpc.as_ref().map(Listener::address)
    }

    /// Where the admin API listens (`http://ip:port` or `unix:PATH`), if configured.
    pub fn admin_address(&self) -> Option<String> {
        self.admin.as_ref().map(|(l, _)| match l {
            Listener::Tcp(_) => format!("http://{}", l.address()),
            Listener::Unix(_) => l.address(),
        })
    }

    /// Where the admin token made up because none was configured was written (a 0600 file).
    pub fn generated_admin_token_file(&self) -> Option<&std::path::Path> {
        self.generated_admin_token.as_deref()
    }

    /// Serve until `shutdown` resolves, then stop every listener and loop, give open
    /// connections `shutdown_grace_secs` to finish, and write out the decision log.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let Sidecar {
            config,
            proxy,
            authorizer,
            http,
            ops,
            grpc,
            admin,
            log_writer,
            tasks,
            stop,
            fleet_start,
            spool,
            tracing,
            ..
        } = self;
        let grace = Duration::from_secs(config.server.shutdown_grace_secs);
        // Decision records are sent until the log writer has written its last line, then for
        // at most the grace period more: it has its own stop.
        let records_stop = CancellationToken::new();
        let publisher = match (spool, config.records_connection(), &config.decision_log.nats) {
            (Some(spool), Some(connection), Some(nats)) => {
                let subject = nats.subject.clone().unwrap_or_else(|| {
                    let node = connection.node_id.clone().unwrap_or_else(crate::fleet::hostname);
                    format!("sandgate.decisions.{}", crate::fleet::sanitize(&node))
                });
                let subjects = if nats.subject.is_some() { subject.clone() } else { "sandgate.decisions.>".into() };
                let (stream, replicas) = (nats.stream.clone(), nats.replicas);
                let (compression, linger) = (nats.compression, Duration::from_millis(nats.linger_ms));
                let stop = records_stop.clone();
                let pending = authorizer.state().metrics.decision_spool_bytes.clone();
                crate::log_sink::on_own_thread(async move {
                    let client = match crate::fleet::connect(&connection, false).await {
                        Ok(client) => client,
                        Err(e) => {
                            tracing::error!(error = %sandgate_auth::error_chain(&e), "decision records cannot reach NATS; they stay in the spool");
                            return;
                        }
                    };
                    let js = async_nats::jetstream::new(client);
                    let mut warned = false;
                    while let Err(e) = crate::log_sink::ensure_stream(&js, &stream, &subjects, replicas).await {
                        if !warned {
                            tracing::warn!(error = %e, "the decision-record stream is not reachable yet; spooling");
                            warned = true;
                        }
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                    tracing::info!(%stream, %subject, "sending decision records to NATS");
                    let to = crate::log_sink::Publishing { subject, compression, linger };
                    crate::log_sink::publish(spool, js, to, stop, grace, pending).await;
                })
            }
            _ => None,
        };
        let limits = listener::Limits {
            header_read_timeout: Duration::from_millis(config.server.header_read_timeout_ms.max(1)),
            max_connections: config.server.max_connections,
            body_read_timeout: Duration::from_millis(config.server.header_read_timeout_ms.max(1)),
            max_receiving_bytes: config.server.max_receiving_bytes,
        };
        let authorizer = Arc::new(authorizer);
        let state = authorizer.state().clone();
        if let Some((listener, token)) = admin {
            let api = Arc::new(AdminApi::new(state.clone(), token));
            let make = move |_| {
                let api = api.clone();
                hyper::service::service_fn(move |request| {
                    let api = api.clone();
                    async move { Ok::<_, Infallible>(api.handle(request).await) }
                })
            };
            // Room for two of the largest admin bodies (a module upload) whatever the check
            // listeners' budget is.
            let admin_limits = listener::Limits {
                max_receiving_bytes: limits.max_receiving_bytes.max(2 * crate::admin_api::MAX_BODY + (1 << 20)),
                ..limits
            };
            let metrics = state.metrics.listener("admin");
            tasks.spawn(listener::serve("admin", listener, make, admin_limits, metrics, stop.clone(), grace));
        }
        if let Some(listener) = grpc {
            let routes = crate::ext_authz::routes(authorizer.clone()).await;
            let make = move |_| hyper_util::service::TowerToHyperService::new(routes.clone());
            let metrics = state.metrics.listener("grpc");
            tasks.spawn(listener::serve("grpc", listener, make, limits, metrics, stop.clone(), grace));
        }
        if let Err(e) = state.fetcher.fetch_all().await {
            tracing::warn!(error = %sandgate_auth::error_chain(&e), "initial JWKS fetch failed; will retry on demand");
        }
        state.fetcher.spawn_refresh(&tasks, &stop);
        if let (Some(fleet), Some(desired)) = (&config.fleet, fleet_start) {
            tasks.spawn(crate::fleet::run(state.clone(), fleet.clone(), fleet.cache_file(), desired, stop.clone()));
        }
        if let Some(dir) = &config.server.policy_dir {
            let every = Duration::from_millis(config.server.policy_dir_poll_ms.max(10));
            tasks.spawn(crate::policy_dir::watch(state.clone(), dir.clone(), every, stop.clone()));
        }
        let ready = Arc::new(AtomicBool::new(false));
        let server = &config.server;
        let mut forward_auth = ForwardAuth::new(authorizer.clone(), &server.auth_prefix, proxy, ready.clone());
        if let Some(listener) = ops {
            forward_auth = forward_auth.without_ops();
            let ops_service = Arc::new(ForwardAuth::new(authorizer.clone(), &server.auth_prefix, proxy, ready.clone()));
            let make = move |_| {
                let ops_service = ops_service.clone();
                hyper::service::service_fn(move |request| {
                    let ops_service = ops_service.clone();
                    async move { Ok::<_, Infallible>(ops_service.handle_ops(&request)) }
                })
            };
            let metrics = state.metrics.listener("ops");
            tasks.spawn(listener::serve("ops", listener, make, limits, metrics, stop.clone(), grace));
        }
        let forward_auth = Arc::new(forward_auth);
        let make = move |peer| {
            let forward_auth = forward_auth.clone();
            hyper::service::service_fn(move |request| {
                let forward_auth = forward_auth.clone();
                async move { Ok::<_, Infallible>(forward_auth.handle(request, peer).await) }
            })
        };
        let metrics = state.metrics.listener("forward-auth");
        tasks.spawn(listener::serve("forward-auth", http, make, limits, metrics, stop.clone(), grace));
        ready.store(true, Ordering::SeqCst);
        tracing::info!("sandgate ready");

        shutdown.await;
        tracing::info!("shutting down: draining every listener, stopping background loops");
        ready.store(false, Ordering::SeqCst);
        stop.cancel();
        tasks.close();
        if tokio::time::timeout(grace + Duration::from_secs(1), tasks.wait()).await.is_err() {
            tracing::warn!("some tasks did not stop within the grace period");
        }
        drop(authorizer);
        log_writer.finish(grace).await;
        records_stop.cancel();
        if let Some(publisher) = publisher {
            let _ = tokio::time::timeout(grace + Duration::from_secs(1), publisher).await;
        }
        if let Some(tracing) = tracing {
            let flushed = tokio::task::spawn_blocking(move || tracing.shutdown());
            let _ = tokio::time::timeout(Duration::from_secs(5), flushed).await;
        }
    }
}

async fn bind_tcp(address: &str, what: &str) -> Result<Listener, StartError> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| StartError::Listen(format!("cannot listen on `{address}`{what}"), e))?;
    Ok(Listener::Tcp(listener))
}

/// Say so when a listener that answers checks takes connections from beyond this host: it is
/// meant for the proxy next to Sandgate, and a client that reaches it directly can hold its
/// connections open (docs/SECURITY.md, "Known gaps").
fn warn_beyond_loopback(listener: &Listener, name: &'static str) {
    if let Listener::Tcp(l) = listener
        && let Ok(address) = l.local_addr()
        && !address.ip().is_loopback()
    {
        tracing::warn!(
            listener = name,
            %address,
            "this listener takes connections from beyond loopback; only the proxy in front should be able to reach it"
        );
    }
}

/// Shortest admin token accepted.
const MIN_ADMIN_TOKEN: usize = 32;

/// Bind the admin listener; returns it, the token calls must carry, and where a token made up
/// because none was configured was written (a 0600 file; never printed).
async fn bind_admin(config: &AdminConfig) -> Result<(Listener, Option<String>, Option<PathBuf>), StartError> {
    let configured = match (&config.token, &config.token_file) {
        (Some(token), _) => Some(token.trim().to_owned()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| StartError::Listen(format!("cannot read the admin token file `{}`", path.display()), e))?
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
    };
    if let Some(token) = &configured
        && token.len() < MIN_ADMIN_TOKEN
    {
        return Err(StartError::Admin(format!(
            "the admin token has {} characters; use at least {MIN_ADMIN_TOKEN} random ones",
            token.len()
        )));
    }
    if let Some(path) = &config.unix_socket {
        let _ = std::fs::remove_file(path);
        // Created with no permission for group or others, never briefly world-accessible.
        let listener = with_private_umask(|| tokio::net::UnixListener::bind(path))
            .map_err(|e| StartError::Listen(format!("cannot listen on `{}`", path.display()), e))?;
        return Ok((Listener::Unix(listener), configured, None));
    }
    let address: std::net::SocketAddr = config
        .listen
        .parse()
        .map_err(|_| StartError::Admin(format!("admin listen address `{}` is not ip:port", config.listen)))?;
    if !address.ip().is_loopback() {
        return Err(StartError::Admin(format!(
            "refusing to start: the admin API would listen on non-loopback `{address}`, and it has no TLS; use a loopback address or unix_socket"
        )));
    }
    let (token, generated) = match configured {
        Some(token) => (token, None),
        None => {
            let mut bytes = [0u8; 24];
            aws_lc_rs::rand::fill(&mut bytes)
                .map_err(|_| StartError::Admin("no randomness for the admin token".into()))?;
            let token = hex::encode(bytes);
            let path = std::env::temp_dir().join(format!("sandgate-admin-{}.token", std::process::id()));
            write_private(&path, &token)
                .map_err(|e| StartError::Listen(format!("cannot write the admin token to `{}`", path.display()), e))?;
            (token, Some(path))
        }
    };
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| StartError::Listen(format!("cannot listen on `{address}`"), e))?;
    Ok((Listener::Tcp(listener), Some(token), generated))
}

/// Run `f` with the process umask at 0o177 (files it creates: owner read/write only).
fn with_private_umask<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: umask only sets the process's file-creation mask; it is restored right after.
    // Start-up runs before any other task creates files.
    let old = unsafe { libc::umask(0o177) };
    let result = f();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    result
}

/// Write `text` to a new file at `path` that only its owner can read.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")
}

/// Raise this process's soft limit on open files to its hard limit, as Go's runtime and nginx's
/// `worker_rlimit_nofile` do: every connection and spool segment is a descriptor, and the
/// usual soft default (1,024) is below one listener's `max_connections`. Returns the soft limit
/// now in force.
fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes only the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return u64::MAX;
    }
    // An unlimited hard limit stands for the kernel's own cap on descriptors.
    let most = if limit.rlim_max == libc::RLIM_INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|n| n.trim().parse::<libc::rlim_t>().ok())
            .unwrap_or(limit.rlim_cur)
    } else {
        limit.rlim_max
    };
    if limit.rlim_cur < most {
        let raised = libc::rlimit { rlim_cur: most, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads only the struct it is given. It fails when the hard limit is
        // unlimited and the kernel caps descriptors lower; the soft limit then stays.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
    }
    limit.rlim_cur
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: as in `raise_open_files_limit`.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
        if limit.rlim_max == libc::RLIM_INFINITY {
            return; // the kernel's cap applies then, which this test cannot know
        }
        let lowered = libc::rlimit { rlim_cur: limit.rlim_max.min(512), rlim_max: limit.rlim_max };
        // SAFETY: as in `raise_open_files_limit`.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) }, 0);
        assert_eq!(super::raise_open_files_limit(), limit.rlim_max);
        let mut now = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) }, 0);
        assert_eq!(now.rlim_cur, limit.rlim_max);
    }
}
