//! The `sandgate serve` configuration file (TOML). See `examples/sandgate.toml` for every
//! field with its default. Reading the file binds nothing and loads nothing: `serve` does that.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Most clock skew an issuer may allow on `exp`/`nbf`.
pub const MAX_LEEWAY_SECS: u64 = 300;

/// The least `[server] max_receiving_bytes`: two gRPC check messages of the largest size.
pub const MIN_RECEIVING_BYTES: usize = 2 << 20;

/// Why a configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read `{}`", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("`{}` is not valid", .0.display())]
    Parse(PathBuf, #[source] toml::de::Error),
    /// The settings contradict each other.
    #[error("{0}")]
    Invalid(String),
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The forward-auth listener.
    #[serde(default)]
    pub server: ServerConfig,
    /// Limits of the policy runtime.
    #[serde(default)]
    pub runtime: RuntimeLimits,
    /// Token issuers the host verifies bearer tokens against.
    #[serde(default)]
    pub issuers: Vec<sandgate_auth::IssuerConfig>,
    /// Policies by id.
    #[serde(default)]
    pub policies: Vec<PolicyConfig>,
    /// Routes, checked in order; the first match picks the policy.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Revoked token ids and subjects.
    #[serde(default)]
    pub revocations: RevocationConfig,
    /// The admin API; absent: no admin API.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// Envoy ext_authz over gRPC; absent: none.
    #[serde(default)]
    pub grpc: Option<GrpcConfig>,
    /// OCI registries that `oci://` modules are pulled from, and the module cache.
    #[serde(default)]
    pub registry: RegistryConfig,
    /// Membership of a fleet sharing desired state through NATS JetStream; absent: this
    /// sidecar stands alone.
    #[serde(default)]
    pub fleet: Option<FleetConfig>,
    /// What decision records carry and where they go.
    #[serde(default)]
    pub decision_log: DecisionLogConfig,
    /// OpenTelemetry tracing; absent: off.
    #[serde(default)]
    pub tracing: Option<TracingConfig>,
}

/// `[tracing]`: each check continues the caller's trace (W3C or B3) and its spans are exported
/// over OTLP/gRPC.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The OTLP/gRPC endpoint, e.g. `http://127.0.0.1:4317`.
    pub otlp_endpoint: String,
    /// `service.name` of the spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Share of checks traced when the caller did not decide (a caller's sampled flag is
    /// followed), 0.0 to 1.0.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
}

fn default_service_name() -> String {
    "sandgate".into()
}

fn default_sample_ratio() -> f64 {
    1.0
}

/// How much of a check its decision record carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Capture {
    /// No decision records (metrics still count every decision).
    None,
    /// The decision and everything that explains it: ids, versions, digests, outcome, reason,
    /// the policy's log lines.
    #[default]
    Metadata,
    /// The metadata, the check as the policy saw it (credentials redacted) and its whole
    /// answer: what `sandgate replay` needs.
    Input,
}

/// Where decision records go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// Standard output.
    #[default]
    Stdout,
    /// A file rotated by size (`path`, `max_file_mib`, `max_files`).
    File,
    /// A NATS JetStream stream, through an on-disk spool (`[decision_log.nats]`).
    Nats,
}

/// `[decision_log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecisionLogConfig {
    /// `none`, `metadata` (default) or `input`.
    pub capture: Capture,
    /// Headers whose values a captured input replaces with `[redacted]`, besides
    /// `authorization`, `proxy-authorization`, `cookie` and `set-cookie`.
    pub redact_headers: Vec<String>,
    /// With `capture = "input"`: where every module and data document that served a check is
    /// kept by digest, for replay; default `$XDG_CACHE_HOME/sandgate/archive`.
    pub archive_dir: Option<PathBuf>,
    /// `stdout` (default), `file` or `nats`.
    pub sink: SinkKind,
    /// The file, with `sink = "file"`.
    pub path: Option<PathBuf>,
    /// A file is rotated past this size (MiB).
    pub max_file_mib: u64,
    /// Rotated files kept (`NAME.1` is the newest).
    pub max_files: u32,
    /// The stream, with `sink = "nats"`.
    pub nats: Option<NatsSinkConfig>,
    /// Records waiting in memory for the sink's writer (MiB); past it, new ones are dropped
    /// and counted. Raise it with `capture = "input"` under heavy load.
    pub queue_mib: u64,
}

impl Default for DecisionLogConfig {
    fn default() -> Self {
        DecisionLogConfig {
            capture: Capture::Metadata,
            redact_headers: Vec::new(),
            archive_dir: None,
            sink: SinkKind::Stdout,
            path: None,
            max_file_mib: 100,
            max_files: 5,
            nats: None,
            queue_mib: 4,
        }
    }
}

/// `[decision_log.nats]`: a JetStream stream decision records are published to, with
/// acknowledgements, through an on-disk spool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSinkConfig {
    /// NATS server URL(s), comma-separated; default: `[fleet] url` (and its credentials).
    #[serde(default)]
    pub url: Option<String>,
    /// The stream (created if missing: file storage, a two-minute duplicate window).
    #[serde(default = "default_stream")]
    pub stream: String,
    /// The subject records are published on; default `sandgate.decisions.<node id>`.
    #[serde(default)]
    pub subject: Option<String>,
    /// Where records wait for their acknowledgement; default
    /// `$XDG_CACHE_HOME/sandgate/spool`.
    #[serde(default)]
    pub spool_dir: Option<PathBuf>,
    /// The spool's limit (MiB): past it, new records are dropped and counted.
    #[serde(default = "default_spool_mib")]
    pub spool_max_mib: u64,
    /// How often (ms) spooled records not yet acknowledged are synced to disk; `0` syncs every
    /// batch before it is sent. Records survive a crash of the process either way (they are in
    /// the kernel's page cache); this bounds what a power loss can take.
    #[serde(default = "default_spool_sync_ms")]
    pub spool_sync_ms: u64,
    /// How long (ms, at most 1000) the publisher lets records gather after a send, until the
    /// spool holds a whole message, so that messages carry more records each (fewer messages
    /// cost the sidecar and JetStream less); `0` sends whatever is spooled at once. Records
    /// reach the stream this much later at most; they are in the spool meanwhile.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// How each message's records are compressed (`lz4`, the default, or `none`).
    #[serde(default)]
    pub compression: crate::log_sink::Compression,
    /// Servers of a cluster that keep the stream, if this sidecar creates it.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// A file holding a NATS token (first line).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// NATS user (with `password_file`).
    #[serde(default)]
    pub user: Option<String>,
    /// A file holding the NATS password (first line).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// A file holding an nkey seed.
    #[serde(default)]
    pub nkey_seed_file: Option<PathBuf>,
    /// A CA (PEM) for the NATS servers; implies TLS.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_stream() -> String {
    "sandgate_decisions".into()
}

fn default_spool_mib() -> u64 {
    256
}

fn default_spool_sync_ms() -> u64 {
    1000
}

fn default_linger_ms() -> u64 {
    50
}

/// The longest `linger_ms`: records wait in the spool for their send at most this long.
const MAX_LINGER_MS: u64 = 1000;

impl Config {
    /// The NATS connection of the decision-record sink: its own settings, or else the fleet's.
    pub fn records_connection(&self) -> Option<FleetConfig> {
        let nats = self.decision_log.nats.as_ref()?;
        match (&nats.url, &self.fleet) {
            (None, Some(fleet)) => Some(fleet.clone()),
            (Some(url), fleet) => {
                let mut config = FleetConfig::client(url, "decisions");
                config.node_id = fleet.as_ref().and_then(|f| f.node_id.clone());
                config.user = nats.user.clone();
                config.password_file = nats.password_file.clone();
                config.token_file = nats.token_file.clone();
                config.nkey_seed_file = nats.nkey_seed_file.clone();
                config.ca_file = nats.ca_file.clone();
                Some(config)
            }
            (None, None) => None,
        }
    }
}

/// What a sidecar does with checks once it has been out of touch with NATS for longer than
/// `max_staleness_secs`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenStale {
    /// Answer them 503 `stale_state` (fail closed: a revocation may have been missed).
    #[default]
    Deny,
    /// Decide them on the last state applied (availability first); readiness is false either way.
    Serve,
}

/// A fleet's NATS connection and this sidecar's place in it.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// NATS server URL(s), comma-separated: `nats://127.0.0.1:4222`.
    pub url: String,
    /// The fleet's name (`[A-Za-z0-9_-]`, 1 to 64): its buckets are `sandgate_<name>` and
    /// `sandgate_<name>_status`.
    pub name: String,
    /// This sidecar's id in the status bucket; default: the host name.
    #[serde(default)]
    pub node_id: Option<String>,
    /// NATS user (with `password` or `password_file`).
    #[serde(default)]
    pub user: Option<String>,
    /// NATS password.
    #[serde(default)]
    pub password: Option<String>,
    /// A file holding the NATS password (first line).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// A NATS token.
    #[serde(default)]
    pub token: Option<String>,
    /// A file holding the NATS token (first line).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// A file holding an nkey seed (`SU…`).
    #[serde(default)]
    pub nkey_seed_file: Option<PathBuf>,
    /// Require TLS.
    #[serde(default)]
    pub tls: bool,
    /// A CA (PEM) for the NATS servers' certificates; implies `tls`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Where the last applied state is kept, to start from while NATS is down; default
    /// `$XDG_CACHE_HOME/sandgate/fleet` (or `~/.cache/sandgate/fleet`).
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Out of touch with NATS for longer than this (seconds), the sidecar is not ready and
    /// `when_stale` applies.
    #[serde(default = "default_max_staleness")]
    pub max_staleness_secs: u64,
    /// `deny` (default) or `serve`.
    #[serde(default)]
    pub when_stale: WhenStale,
    /// How often the status is written, in milliseconds.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_ms: u64,
    /// How many servers of a NATS cluster keep the status bucket when this sidecar is the
    /// first to open it (the desired-state bucket is created by `sandgate fleet --replicas`).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
}

fn default_replicas() -> usize {
    1
}

fn default_max_staleness() -> u64 {
    30
}

fn default_heartbeat() -> u64 {
    1000
}

impl std::fmt::Debug for FleetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetConfig")
            .field("url", &self.url)
            .field("name", &self.name)
            .field("node_id", &self.node_id)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("max_staleness_secs", &self.max_staleness_secs)
            .field("when_stale", &self.when_stale)
            .finish_non_exhaustive()
    }
}

impl FleetConfig {
    /// The file the last applied state is cached in.
    pub fn cache_file(&self) -> PathBuf {
        let dir = self
            .cache_dir
            .clone()
            .unwrap_or_else(|| cache_home().unwrap_or_else(|| PathBuf::from(".")).join("sandgate").join("fleet"));
        dir.join(format!("{}.json", self.name))
    }

    /// A connection-only configuration (the CLI's).
    pub fn client(url: &str, name: &str) -> Self {
        FleetConfig {
            url: url.to_owned(),
            name: name.to_owned(),
            node_id: None,
            user: None,
            password: None,
            password_file: None,
            token: None,
            token_file: None,
            nkey_seed_file: None,
            tls: false,
            ca_file: None,
            cache_dir: None,
            max_staleness_secs: default_max_staleness(),
            when_stale: WhenStale::Deny,
            heartbeat_ms: default_heartbeat(),
            replicas: default_replicas(),
        }
    }
}

/// The user's cache directory: `$XDG_CACHE_HOME`, else `$HOME/.cache`.
pub fn cache_home() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
}

/// Whether `name` can name a fleet (and its buckets).
pub fn valid_fleet_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// How `oci://` modules are pulled and cached.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// The content-addressed module cache; a sidecar restarted while its registry is down
    /// starts from it. Default: `$XDG_CACHE_HOME/sandgate/oci` (or `~/.cache/sandgate/oci`).
    pub cache_dir: Option<PathBuf>,
    /// Never contact a registry: serve only cached modules (a tag by the digest it last
    /// resolved to). `sandgate serve --offline` sets it.
    pub offline: bool,
    /// Largest module layer pulled, in MiB.
    pub max_module_mib: u64,
    /// Registries (`host:port`) reached over plain HTTP (no TLS: anyone on the path can read
    /// and change what is pulled; the digest check still refuses a changed module, but a tag
    /// can be moved).
    pub plain_http: Vec<String>,
    /// Reach loopback registries (`localhost`, `127.0.0.0/8`, `[::1]`) over plain HTTP unless
    /// they are listed in `tls`.
    pub loopback_plain_http: bool,
    /// Registries reached over TLS even though they are loopback.
    pub tls: Vec<String>,
    /// Extra trusted root certificates (PEM) for registries signed by a private CA.
    pub ca_file: Option<PathBuf>,
    /// Connect and read timeout, in seconds.
    pub timeout_secs: u64,
    /// The longest one pull (manifest, signatures, module) may take, in seconds.
    pub pull_deadline_secs: u64,
    /// Registries (`host:port`) modules may be pulled from, also through the admin API;
    /// empty: any.
    pub allowed_registries: Vec<String>,
    /// Credentials per registry; anonymous for the others.
    pub credentials: Vec<RegistryCredentials>,
    /// Cosign public keys (PEM files). When set, an `oci://` module is loaded only if one of
    /// them signed its manifest digest (`cosign sign --key`); a cached module only if such a
    /// signature was verified when it was pulled.
    pub cosign_public_keys: Vec<PathBuf>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            cache_dir: None,
            offline: false,
            max_module_mib: 32,
            plain_http: Vec::new(),
            loopback_plain_http: true,
            tls: Vec::new(),
            ca_file: None,
            timeout_secs: 30,
            pull_deadline_secs: 120,
            allowed_registries: Vec::new(),
            credentials: Vec::new(),
            cosign_public_keys: Vec::new(),
        }
    }
}

/// Credentials for one registry: `username` with `password` or `password_file` (basic
/// authentication, also offered to the registry's token service when it answers with a bearer
/// challenge), or a `token` / `token_file` presented as a bearer token.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryCredentials {
    /// The registry, `host[:port]` as in the references.
    pub registry: String,
    /// User name.
    #[serde(default)]
    pub username: Option<String>,
    /// Password.
    #[serde(default)]
    pub password: Option<String>,
    /// A file holding the password (first line).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// A bearer token.
    #[serde(default)]
    pub token: Option<String>,
    /// A file holding the bearer token (first line).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

/// The Envoy ext_authz gRPC listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    /// Address to listen on.
    pub listen: String,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig { listen: "127.0.0.1:8183".into() }
    }
}

/// The admin API's listener and credentials.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// TCP address; loopback by default. Ignored when `unix_socket` is set.
    pub listen: String,
    /// A Unix socket path instead of TCP (created mode 0600; no token needed).
    pub unix_socket: Option<PathBuf>,
    /// The bearer token admin calls must carry.
    pub token: Option<String>,
    /// A file holding the token (first line), instead of `token`.
    pub token_file: Option<PathBuf>,
    /// If not empty, only modules with these sha256 digests may be loaded.
    pub allowed_digests: Vec<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:8182".into(),
            unix_socket: None,
            token: None,
            token_file: None,
            allowed_digests: Vec::new(),
        }
    }
}

/// The forward-auth listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: String,
    /// A separate address for `/healthz`, `/readyz` and `/metrics`; when set they are no longer
    /// answered on `listen`, so no check can be answered by a health endpoint.
    pub ops_listen: Option<String>,
    /// Path prefix of forward-auth checks; the rest of the path is the original path when no
    /// `X-Forwarded-Uri`/`X-Original-URI` header says otherwise (Envoy HTTP ext_authz).
    pub auth_prefix: String,
    /// The proxy in front, which decides the only headers read for the original request:
    /// `nginx` (`X-Original-Method`/`-URI`, `X-Forwarded-Host`/`-Proto`/`-For`, all set by the
    /// nginx configuration), `forwarded` (Caddy, Traefik: `X-Forwarded-Method`/`-Uri`/`-Host`/
    /// `-Proto`/`-For`), `envoy` (the request itself: the path after `auth_prefix`, its method
    /// and host; `X-Forwarded-Proto`/`-For`). Required: a proxy passes its client's other
    /// headers on, so a guessed convention would let a client choose what is checked.
    pub proxy: Option<ProxyKind>,
    /// Policy for requests no route matches; without one they are denied (`no_route`).
    pub default_policy: Option<String>,
    /// Extra identity headers on an allow: header name → claim name (e.g.
    /// `"x-auth-subject" = "sub"`). Lists are joined with spaces.
    pub identity_headers: BTreeMap<String, String>,
    /// Grace period for in-flight checks on SIGTERM, in seconds.
    pub shutdown_grace_secs: u64,
    /// How long a client may take to send a request's headers, and a keep-alive connection may
    /// stay idle, in milliseconds, before it is closed (every listener); also how long a body
    /// a listener reads (a gRPC check's message) may take to arrive once its headers have.
    pub header_read_timeout_ms: u64,
    /// Connections open at once on each listener. At the cap a new connection closes the open
    /// one idle the longest, gracefully; it waits in the backlog only while none is idle.
    pub max_connections: usize,
    /// Bytes of request bodies still being received that each listener holds at once, over all
    /// its connections (a gRPC check's message is held until it is whole). Past it, the body
    /// being read fails: a gRPC check ends `RESOURCE_EXHAUSTED`, which Envoy answers as a deny.
    /// The admin listener's is at least 65 MiB, two of its largest bodies.
    pub max_receiving_bytes: usize,
    /// A directory watched for policy modules: `ID.wasm` (with optional data `ID.json`) is
    /// loaded as policy `ID` when it appears or changes, and unloaded when it disappears.
    pub policy_dir: Option<PathBuf>,
    /// How often the policy directory is scanned, in milliseconds.
    pub policy_dir_poll_ms: u64,
    /// Verified tokens remembered (by SHA-256 and key-set version, from their second use until
    /// their `exp`, at most 5 minutes) so a repeated token skips its signature check; 0 turns
    /// the cache off.
    pub token_cache_size: usize,
}

/// How the proxy in front passes the original request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyKind {
    /// nginx `auth_request`.
    Nginx,
    /// Caddy `forward_auth`, Traefik ForwardAuth.
    Forwarded,
    /// Envoy HTTP ext_authz.
    Envoy,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8181".into(),
            ops_listen: None,
            auth_prefix: "/auth".into(),
            proxy: None,
            default_policy: None,
            identity_headers: BTreeMap::new(),
            shutdown_grace_secs: 10,
            header_read_timeout_ms: 15_000,
            max_connections: 4096,
            max_receiving_bytes: 64 << 20,
            policy_dir: None,
            policy_dir_poll_ms: 500,
            token_cache_size: 10_000,
        }
    }
}

/// Limits of the policy runtime.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeLimits {
    /// Policy instances alive at once.
    pub max_instances: u32,
    /// Time budget of one policy call, in milliseconds.
    pub timeout_ms: u64,
    /// Memory cap of one instance, in MiB.
    pub memory_limit_mib: usize,
    /// How long a check waits for a free instance, in milliseconds, before a 503.
    pub queue_timeout_ms: u64,
    /// Reset all of an instance's memory after each check, not only the pages found written.
    /// On automatically when swap is enabled at start; set it if swap may be enabled later.
    pub full_memory_reset: bool,
    /// Threads policies run on; 0: one per core. Health checks, metrics and reading requests
    /// never wait behind a policy.
    pub eval_threads: usize,
    /// Threads one policy may occupy at once; 0: all but one (at least one), so one route's
    /// slow policy cannot stall the others.
    pub max_threads_per_policy: usize,
}

impl Default for RuntimeLimits {
    fn default() -> Self {
        let d = sandgate_runtime::RuntimeConfig::default();
        RuntimeLimits {
            max_instances: d.max_instances,
            timeout_ms: d.timeout.as_millis() as u64,
            memory_limit_mib: d.memory_limit >> 20,
            queue_timeout_ms: d.queue_timeout.as_millis() as u64,
            full_memory_reset: d.full_memory_reset,
            eval_threads: d.eval_threads,
            max_threads_per_policy: d.max_threads_per_policy,
        }
    }
}

impl RuntimeLimits {
    /// As the runtime's configuration.
    pub fn runtime_config(&self) -> sandgate_runtime::RuntimeConfig {
        sandgate_runtime::RuntimeConfig {
            max_instances: self.max_instances,
            timeout: std::time::Duration::from_millis(self.timeout_ms),
            memory_limit: self.memory_limit_mib << 20,
            queue_timeout: std::time::Duration::from_millis(self.queue_timeout_ms),
            full_memory_reset: self.full_memory_reset,
            eval_threads: self.eval_threads,
            max_threads_per_policy: self.max_threads_per_policy,
        }
    }
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = |set: bool| if set { "***" } else { "-" };
        f.debug_struct("RegistryCredentials")
            .field("registry", &self.registry)
            .field("username", &self.username)
            .field("password", &secret(self.password.is_some()))
            .field("password_file", &self.password_file)
            .field("token", &secret(self.token.is_some()))
            .field("token_file", &self.token_file)
            .finish()
    }
}

/// Where a module comes from: a file, or an OCI artifact (`oci://HOST/REPO:TAG` or
/// `oci://HOST/REPO@sha256:…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleSource {
    /// A compiled component on disk.
    File(PathBuf),
    /// An artifact in an OCI registry.
    Oci(sandgate_registry::ModuleRef),
}

impl<'de> Deserialize<'de> for ModuleSource {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if sandgate_registry::ModuleRef::is_oci(&text) {
            text.parse().map(ModuleSource::Oci).map_err(serde::de::Error::custom)
        } else {
            Ok(ModuleSource::File(PathBuf::from(text)))
        }
    }
}

impl std::fmt::Display for ModuleSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModuleSource::File(path) => write!(f, "{}", path.display()),
            ModuleSource::Oci(reference) => write!(f, "{reference}"),
        }
    }
}

/// One policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// The id routes refer to.
    pub id: String,
    /// The compiled component: a file path, or `oci://HOST/REPO:TAG` / `oci://HOST/REPO@sha256:…`.
    pub module: ModuleSource,
    /// Its data document (JSON).
    #[serde(default)]
    pub data: Option<PathBuf>,
}

/// One route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Host to match (exact, case-insensitive, port ignored); any host when absent.
    #[serde(default)]
    pub host: Option<String>,
    /// Path prefix to match, on segment boundaries (`/api` matches `/api` and `/api/x`, not
    /// `/apix`); `/` when absent.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// The policy id.
    pub policy: String,
}

/// Revocations known at start.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationConfig {
    /// Revoked `jti`s.
    #[serde(default)]
    pub jtis: Vec<String>,
    /// Subjects whose tokens are all revoked.
    #[serde(default)]
    pub subjects: Vec<String>,
}

impl Config {
    /// Read and check a configuration file. Relative paths in it are resolved against the
    /// file's directory.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse(path.to_owned(), e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.check()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        self.server.policy_dir.as_mut().map(resolve);
        if let Some(admin) = &mut self.admin {
            admin.unix_socket.as_mut().map(resolve);
            admin.token_file.as_mut().map(resolve);
        }
        self.registry.cache_dir.as_mut().map(resolve);
        self.registry.ca_file.as_mut().map(resolve);
        self.registry.cosign_public_keys.iter_mut().for_each(resolve);
        if let Some(fleet) = &mut self.fleet {
            for p in [
                &mut fleet.password_file,
                &mut fleet.token_file,
                &mut fleet.nkey_seed_file,
                &mut fleet.ca_file,
                &mut fleet.cache_dir,
            ]
            .into_iter()
            .flatten()
            {
                resolve(p);
            }
        }
        {
            let log = &mut self.decision_log;
            log.archive_dir.as_mut().map(resolve);
            log.path.as_mut().map(resolve);
            if let Some(nats) = &mut log.nats {
                for p in [
                    &mut nats.spool_dir,
                    &mut nats.token_file,
                    &mut nats.password_file,
                    &mut nats.nkey_seed_file,
                    &mut nats.ca_file,
                ]
                .into_iter()
                .flatten()
                {
                    resolve(p);
                }
            }
        }
        for credentials in &mut self.registry.credentials {
            credentials.password_file.as_mut().map(resolve);
            credentials.token_file.as_mut().map(resolve);
        }
        for policy in &mut self.policies {
            if let ModuleSource::File(path) = &mut policy.module {
                resolve(path);
            }
            policy.data.as_mut().map(resolve);
        }
        for key in self.issuers.iter_mut().flat_map(|i| i.keys.iter_mut()) {
            for p in [&mut key.pem_file, &mut key.jwk_file, &mut key.jwks_file].into_iter().flatten() {
                resolve(p);
            }
        }
    }

    /// Cross-field checks serde cannot do.
    pub fn check(&self) -> Result<(), ConfigError> {
        macro_rules! bail {
            ($($message:tt)*) => {
                return Err(ConfigError::Invalid(format!($($message)*)))
            };
        }
        let ids: Vec<&str> = self.policies.iter().map(|p| p.id.as_str()).collect();
        if self.server.max_receiving_bytes < MIN_RECEIVING_BYTES {
            bail!(
                "[server] max_receiving_bytes must be at least {MIN_RECEIVING_BYTES}: room for two of the largest gRPC check messages"
            );
        }
        if let Some(tracing) = &self.tracing {
            if !tracing.otlp_endpoint.starts_with("http://") && !tracing.otlp_endpoint.starts_with("https://") {
                bail!("[tracing] otlp_endpoint must be an http:// or https:// URL");
            }
            if !(0.0..=1.0).contains(&tracing.sample_ratio) {
                bail!("[tracing] sample_ratio must be between 0.0 and 1.0");
            }
        }
        let log = &self.decision_log;
        match log.sink {
            SinkKind::File if log.path.is_none() => bail!("[decision_log] sink = \"file\" needs `path`"),
            SinkKind::Nats if log.nats.is_none() => {
                bail!("[decision_log] sink = \"nats\" needs a [decision_log.nats] table")
            }
            SinkKind::Nats if self.records_connection().is_none() => {
                bail!("[decision_log.nats] needs `url`, or a [fleet] whose NATS it uses")
            }
            _ => {}
        }
        if log.sink != SinkKind::Nats && log.nats.is_some() {
            bail!("[decision_log.nats] is set but sink is not \"nats\"");
        }
        if !(1..=1024).contains(&log.queue_mib) {
            bail!("[decision_log] queue_mib must be 1 to 1024");
        }
        if log.max_file_mib == 0 {
            bail!("[decision_log] max_file_mib must be at least 1");
        }
        if let Some(nats) = &log.nats {
            if nats.spool_max_mib == 0 {
                bail!("[decision_log.nats] spool_max_mib must be at least 1");
            }
            if nats.linger_ms > MAX_LINGER_MS {
                bail!("[decision_log.nats] linger_ms must be at most {MAX_LINGER_MS}");
            }
            if !(1..=5).contains(&nats.replicas) {
                bail!("[decision_log.nats] replicas must be 1 to 5");
            }
            let subject_ok =
                |s: &str| !s.is_empty() && !s.contains([' ', '*', '>']) && !s.starts_with('.') && !s.ends_with('.');
            if nats.subject.as_deref().is_some_and(|s| !subject_ok(s)) {
                bail!("[decision_log.nats] subject must be a NATS subject without wildcards");
            }
            if !valid_fleet_name(&nats.stream) {
                bail!("[decision_log.nats] stream `{}` must be 1 to 64 of [A-Za-z0-9_-]", nats.stream);
            }
        }
        for name in &log.redact_headers {
            if name.is_empty() || name.bytes().any(|b| b.is_ascii_uppercase() || b == b' ' || b == b':') {
                bail!("[decision_log] redact_headers: `{name}` must be a lowercase header name");
            }
        }
        // With a policy directory, routes may name policies it will provide; until one is
        // loaded its route answers 403 `no_route`.
        let known = |id: &str| ids.contains(&id) || self.server.policy_dir.is_some() || self.fleet.is_some();
        if let Some(fleet) = &self.fleet {
            if !valid_fleet_name(&fleet.name) {
                bail!("[fleet] name `{}` must be 1 to 64 of [A-Za-z0-9_-]", fleet.name);
            }
            if let Some(node) = &fleet.node_id
                && !valid_fleet_name(node)
            {
                bail!("[fleet] node_id `{node}` must be 1 to 64 of [A-Za-z0-9_-]");
            }
            if !self.policies.is_empty() || self.server.policy_dir.is_some() {
                bail!(
                    "[fleet] is set: policies come from the fleet (`sandgate fleet put-policy`), not from [[policies]] or policy_dir"
                );
            }
            if !self.revocations.jtis.is_empty() || !self.revocations.subjects.is_empty() {
                bail!(
                    "[fleet] is set: revocations come from the fleet (`sandgate fleet revoke`), not from [revocations]"
                );
            }
            if !(1..=5).contains(&fleet.replicas) {
                bail!("[fleet] replicas must be 1 to 5 (JetStream's limit)");
            }
            if fleet.max_staleness_secs == 0 {
                bail!("[fleet] max_staleness_secs must be at least 1");
            }
        }
        for route in &self.routes {
            if !known(&route.policy) {
                bail!("route to unknown policy `{}` (policies: {ids:?})", route.policy);
            }
        }
        if let Some(id) = &self.server.default_policy
            && !known(id)
        {
            bail!("default_policy `{id}` is not a configured policy (policies: {ids:?})");
        }
        if self.server.proxy.is_none() {
            bail!(
                "[server] proxy is not set: name the proxy in front (\"nginx\", \"forwarded\" for Caddy and Traefik, or \"envoy\"); it decides which headers carry the original request"
            );
        }
        let prefix = self.server.auth_prefix.trim_end_matches('/');
        if !self.server.auth_prefix.starts_with('/')
            || prefix.is_empty()
            || ["/healthz", "/readyz", "/metrics"].contains(&prefix)
        {
            bail!(
                "auth_prefix `{}` must start with `/` and not be `/`, `/healthz`, `/readyz` or `/metrics`",
                self.server.auth_prefix
            );
        }
        for c in &self.registry.credentials {
            let password = usize::from(c.password.is_some()) + usize::from(c.password_file.is_some());
            let token = usize::from(c.token.is_some()) + usize::from(c.token_file.is_some());
            match (c.username.is_some(), password, token) {
                (true, 1, 0) | (false, 0, 1) => {}
                _ => bail!(
                    "[[registry.credentials]] `{}`: give `username` with one of `password` / `password_file`, or one of `token` / `token_file`",
                    c.registry
                ),
            }
        }
        let r = &self.registry;
        if !(1..=1024).contains(&r.max_module_mib) || r.timeout_secs == 0 || r.pull_deadline_secs == 0 {
            bail!("[registry] max_module_mib must be 1 to 1024, timeout_secs and pull_deadline_secs at least 1");
        }
        for issuer in &self.issuers {
            if issuer.leeway_secs > MAX_LEEWAY_SECS {
                bail!(
                    "issuer `{}`: leeway_secs {} is more than {MAX_LEEWAY_SECS}: an expired token would stay valid that long",
                    issuer.issuer,
                    issuer.leeway_secs
                );
            }
            if issuer.algorithms.is_empty() {
                bail!("issuer `{}` accepts no algorithms", issuer.issuer);
            }
            for alg in &issuer.algorithms {
                if let Err(e) = sandgate_auth::parse_algorithm(alg) {
                    bail!("issuer `{}`: {e}", issuer.issuer);
                }
            }
            if issuer.keys.is_empty() && issuer.jwks_url.is_none() && issuer.discovery_url.is_none() {
                bail!("issuer `{}` has no keys, no jwks_url and no discovery_url", issuer.issuer);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(text: &str) -> Result<(), String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        config.check().map_err(|e| e.to_string())
    }

    #[test]
    fn the_proxy_must_be_named() {
        let error = checked("[server]\n").unwrap_err();
        assert!(error.contains("[server] proxy is not set"), "{error}");
        assert!(checked("[server]\nproxy = \"auto\"\n").unwrap_err().contains("unknown variant `auto`"));
        for proxy in ["nginx", "forwarded", "envoy"] {
            assert_eq!(checked(&format!("[server]\nproxy = \"{proxy}\"\n")), Ok(()));
        }
    }

    #[test]
    fn modules_are_files_or_oci_references() {
        let config: Config = toml::from_str(
            "[[policies]]\nid = \"a\"\nmodule = \"a.wasm\"\n[[policies]]\nid = \"b\"\nmodule = \"oci://localhost:5000/b:v1\"\n",
        )
        .unwrap();
        assert_eq!(config.policies[0].module, ModuleSource::File("a.wasm".into()));
        assert!(matches!(&config.policies[1].module, ModuleSource::Oci(r) if r.tag() == Some("v1")));
        let error = toml::from_str::<Config>("[[policies]]\nid = \"a\"\nmodule = \"oci://localhost:5000/b\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("no tag or digest"), "{error}");
    }

    #[test]
    fn registry_credentials_are_one_kind() {
        let base = "[server]\nproxy = \"envoy\"\n[[registry.credentials]]\nregistry = \"r.example\"\n";
        assert_eq!(checked(&format!("{base}username = \"u\"\npassword = \"p\"\n")), Ok(()));
        assert_eq!(checked(&format!("{base}token = \"t\"\n")), Ok(()));
        for bad in
            ["username = \"u\"\n", "password = \"p\"\n", "username = \"u\"\npassword = \"p\"\ntoken = \"t\"\n", ""]
        {
            assert!(checked(&format!("{base}{bad}")).unwrap_err().contains("registry.credentials"), "{bad}");
        }
    }

    #[test]
    fn leeway_is_capped() {
        let issuer = |leeway: u64| {
            format!(
                "[server]\nproxy = \"envoy\"\n[[issuers]]\nissuer = \"i\"\nalgorithms = [\"HS256\"]\njwks_url = \"https://i/jwks\"\nleeway_secs = {leeway}\n"
            )
        };
        assert_capped(issuer, MAX_LEEWAY_SECS, "leeway_secs");
    }

    /// `config(max)` is accepted and `config(max + 1)` refused with an error naming `field`.
    fn assert_capped(config: impl Fn(u64) -> String, max: u64, field: &str) {
        assert_eq!(checked(&config(max)), Ok(()));
        assert!(checked(&config(max + 1)).unwrap_err().contains(field));
    }

    #[test]
    fn the_record_linger_is_capped() {
        let nats = |linger: u64| {
            format!(
                "[server]\nproxy = \"envoy\"\n[decision_log]\nsink = \"nats\"\n[decision_log.nats]\nurl = \"nats://n:4222\"\nlinger_ms = {linger}\n"
            )
        };
        assert_capped(nats, MAX_LINGER_MS, "linger_ms");
    }

    #[test]
    fn the_receiving_budget_holds_two_check_messages() {
        let server = |bytes: usize| format!("[server]\nproxy = \"envoy\"\nmax_receiving_bytes = {bytes}\n");
        assert_eq!(checked(&server(MIN_RECEIVING_BYTES)), Ok(()));
        assert!(checked(&server(MIN_RECEIVING_BYTES - 1)).unwrap_err().contains("max_receiving_bytes"));
    }
}
