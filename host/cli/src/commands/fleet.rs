//! `sandgate fleet --url URL --name NAME <command>`: write the fleet's desired state in NATS
//! JetStream and read its sidecars' status. Every write takes `--wait[=SECS]`: it returns once
//! every live sidecar has applied the write's revision (fleet-wide read-your-writes), names
//! the sidecars that lag or failed to apply it, and exits 1 if any did.

use anyhow::{Context, bail};
use futures_util::StreamExt;
use sandgate_registry::{ModuleRef, TagFallback};
use sandgate_server::config::{FleetConfig, valid_fleet_name};
use sandgate_server::fleet::desired::{FLEET_OBJECT, IssuerItem, Key, PolicyItem, RevocationItem, RouteItem};
use sandgate_server::fleet::status::{NodeStatus, status_store};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// NATS server URL(s), comma-separated.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    url: String,
    /// The fleet's name.
    #[arg(long)]
    name: String,
    /// NATS user (the password from `--password-stdin` or `SANDGATE_NATS_PASSWORD`).
    #[arg(long)]
    user: Option<String>,
    /// Read the NATS password from the first line of standard input.
    #[arg(long, requires = "user")]
    password_stdin: bool,
    /// A file holding a NATS token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// A file holding an nkey seed.
    #[arg(long)]
    nkey_seed_file: Option<PathBuf>,
    /// A CA (PEM) for the NATS servers (implies TLS).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// How many servers of a NATS cluster keep the fleet's buckets, when this command is the
    /// first to create them (1 to 5).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    replicas: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Run `MODULE` as policy `ID` on every sidecar: `oci://…` (a tag is resolved here, so the
    /// fleet gets one digest), or a `.wasm` file, uploaded into the fleet's object store. The
    /// module is checked (compiled, probed) first.
    PutPolicy {
        id: String,
        /// `oci://HOST/REPO:TAG`, `oci://HOST/REPO@sha256:…`, or a file.
        module: String,
        /// Write the reference as given, without pulling or checking it.
        #[arg(long)]
        no_verify: bool,
        #[command(flatten)]
        wait: Wait,
        #[command(flatten)]
        registry: super::registry::RegistryArgs,
    },
    /// Stop running policy `ID` (its routes then answer 403 `no_route`).
    RemovePolicy {
        id: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Replace policy `ID`'s data document with `FILE` (JSON). The document is also kept in the
    /// fleet's object store by its digest, where `sandgate replay --fetch` finds every version.
    PutData {
        id: String,
        file: PathBuf,
        #[command(flatten)]
        wait: Wait,
    },
    /// Revoke a token id or every token of a subject.
    Revoke {
        #[command(flatten)]
        target: Target,
        /// When the revocation may lapse (the tokens have expired by then): Unix seconds, or
        /// from now as `90s`, `15m`, `12h`, `7d`. Default: until `unrevoke`.
        #[arg(long)]
        until: Option<String>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Remove a revocation.
    Unrevoke {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        wait: Wait,
    },
    /// Evaluate `MODULE` (as for `put-policy`) beside policy `ID` on every check without
    /// affecting the answer; `--remove` stops it.
    Shadow {
        id: String,
        /// `oci://…` or a `.wasm` file.
        #[arg(required_unless_present = "remove")]
        module: Option<String>,
        /// Stop shadowing.
        #[arg(long, conflicts_with = "module")]
        remove: bool,
        #[command(flatten)]
        wait: Wait,
        #[command(flatten)]
        registry: super::registry::RegistryArgs,
    },
    /// Send requests for `--host`/`--path-prefix` to `--policy` (fleet routes come before a
    /// sidecar's own, most specific first); `--remove` drops route `NAME`.
    Route {
        /// The route's name (`[A-Za-z0-9_-]`).
        name: String,
        /// The policy id requests on this route are decided by.
        #[arg(long, required_unless_present = "remove")]
        policy: Option<String>,
        /// Path prefix, matched on segment boundaries.
        #[arg(long, default_value = "/")]
        path_prefix: String,
        /// Host (without port); default: any.
        #[arg(long)]
        host: Option<String>,
        /// Remove the route.
        #[arg(long, conflicts_with_all = ["policy", "host"])]
        remove: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// Trust tokens of issuer `ISS` (its exact `iss`) on every sidecar, verified with the
    /// public keys of `--jwks FILE`; `--remove` stops trusting it.
    Issuer {
        iss: String,
        /// Accepted audience (repeatable; at least one).
        #[arg(long = "audience", required_unless_present = "remove")]
        audiences: Vec<String>,
        /// Accepted algorithm (repeatable), e.g. RS256, ES256, EdDSA.
        #[arg(long = "algorithm", required_unless_present = "remove")]
        algorithms: Vec<String>,
        /// Its public keys (a JWKS file).
        #[arg(long, required_unless_present = "remove")]
        jwks: Option<PathBuf>,
        /// Clock leeway for `exp`/`nbf`, in seconds.
        #[arg(long, default_value_t = 30)]
        leeway_secs: u64,
        /// Stop trusting the issuer.
        #[arg(long, conflicts_with_all = ["audiences", "algorithms", "jwks"])]
        remove: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// Replace the static keys of issuer `ISS` (configured on the sidecars or from the fleet)
    /// with the public keys of `JWKS` (a file): a rotation; `--remove` returns to the keys it
    /// had before.
    Keys {
        iss: String,
        /// A JWKS file with the issuer's public keys.
        #[arg(required_unless_present = "remove")]
        jwks: Option<PathBuf>,
        /// Return to the keys the issuer had before.
        #[arg(long, conflicts_with = "jwks")]
        remove: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// Every sidecar's applied revision, errors and heartbeat.
    Status,
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct Target {
    /// A token id (`jti`).
    #[arg(long)]
    jti: Option<String>,
    /// A subject (`sub`): all its tokens.
    #[arg(long)]
    subject: Option<String>,
}

impl Target {
    fn key(&self) -> Key {
        match (&self.jti, &self.subject) {
            (Some(jti), _) => Key::RevokedJti(jti.clone()),
            (None, Some(subject)) => Key::RevokedSubject(subject.clone()),
            (None, None) => Key::RevokedJti(String::new()),
        }
    }
}

#[derive(clap::Args)]
struct Wait {
    /// Return only when every live sidecar has applied this write (default timeout 30 s).
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "30", require_equals = true)]
    wait: Option<String>,
}

impl Wait {
    fn timeout(&self) -> anyhow::Result<Option<Duration>> {
        self.wait.as_deref().map(parse_duration).transpose()
    }
}

fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let (number, unit) = text.find(|c: char| !c.is_ascii_digit()).map_or((text, ""), |i| text.split_at(i));
    let n: u64 = number.parse().with_context(|| format!("`{text}` is not a duration (e.g. 30, 30s, 500ms, 5m)"))?;
    Ok(match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86400),
        _ => bail!("`{text}` is not a duration (e.g. 30, 30s, 500ms, 5m)"),
    })
}

fn parse_until(text: &str) -> anyhow::Result<u64> {
    if text.bytes().all(|b| b.is_ascii_digit()) && text.len() >= 9 {
        return Ok(text.parse()?);
    }
    Ok(sandgate_server::unix_now() + parse_duration(text)?.as_secs())
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if !valid_fleet_name(&args.name) {
        bail!("`{}` is not a fleet name: 1 to 64 of [A-Za-z0-9_-]", args.name);
    }
    let mut config = FleetConfig::client(&args.url, &args.name);
    if let Some(user) = &args.user {
        config.user = Some(user.clone());
        config.password = Some(super::password(args.password_stdin, "SANDGATE_NATS_PASSWORD", "--user")?);
    }
    config.token_file = args.token_file.clone();
    config.nkey_seed_file = args.nkey_seed_file.clone();
    config.ca_file = args.ca_file.clone();
    config.replicas = usize::from(args.replicas);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(execute(config, args.command))
}

async fn execute(config: FleetConfig, command: Command) -> anyhow::Result<ExitCode> {
    let client = sandgate_server::fleet::connect(&config, true).await?;
    let js = async_nats::jetstream::new(client);
    if let Command::Status = command {
        return status(&js, &config.name, config.replicas).await;
    }
    let kv = desired_store(&js, &config.name, config.replicas).await?;
    // The status bucket too, so that it has the replicas asked for here.
    status_store(&js, &config.name, config.replicas).await.map_err(|e| anyhow::anyhow!(e))?;
    let put = |key: String, value: Vec<u8>, shown: String| {
        let kv = kv.clone();
        async move {
            let revision = kv.put(&key, value.into()).await.context("the write failed")?;
            eprintln!("{shown} at revision {revision}");
            anyhow::Ok((key, revision))
        }
    };
    let written = Instant::now();
    let (key, revision, wait) = match command {
        Command::Status => return status(&js, &config.name, config.replicas).await,
        Command::PutPolicy { id, module, no_verify, wait, registry } => {
            let module = if no_verify { module } else { checked_module(&js, &config, &module, &registry).await? };
            let value = serde_json::to_vec(&PolicyItem { module: module.clone() })?;
            let key = Key::Policy(id).encode();
            let (key, revision) = put(key.clone(), value, format!("{key} = {module}")).await?;
            (key, revision, wait)
        }
        Command::Shadow { id, module: Some(module), remove: false, wait, registry } => {
            let module = checked_module(&js, &config, &module, &registry).await?;
            let value = serde_json::to_vec(&PolicyItem { module: module.clone() })?;
            let key = Key::Shadow(id).encode();
            let (key, revision) = put(key.clone(), value, format!("{key} = {module}")).await?;
            (key, revision, wait)
        }
        Command::Shadow { id, wait, .. } => delete(&js, &config.name, &kv, Key::Shadow(id).encode(), wait).await?,
        Command::Route { name, policy: Some(policy), path_prefix, host, remove: false, wait } => {
            if !valid_fleet_name(&name) {
                bail!("`{name}` is not a route name: 1 to 64 of [A-Za-z0-9_-]");
            }
            if !path_prefix.starts_with('/') {
                bail!("--path-prefix `{path_prefix}` must start with `/`");
            }
            let value = serde_json::to_vec(&RouteItem { host, path_prefix, policy })?;
            let key = Key::Route(name).encode();
            let (key, revision) = put(key.clone(), value, key.clone()).await?;
            (key, revision, wait)
        }
        Command::Route { name, wait, .. } => delete(&js, &config.name, &kv, Key::Route(name).encode(), wait).await?,
        Command::Issuer { iss, audiences, algorithms, jwks: Some(jwks), leeway_secs, remove: false, wait } => {
            let jwks = read_jwks(&jwks)?;
            for algorithm in &algorithms {
                sandgate_auth::parse_algorithm(algorithm)?;
            }
            let item = IssuerItem { audiences, algorithms, leeway_secs, jwks };
            sandgate_server::fleet::apply::check_issuer_item(&item)
                .map_err(|e| anyhow::anyhow!("issuer `{iss}`: {e}"))?;
            let value = serde_json::to_vec(&item)?;
            let key = Key::Issuer(iss.clone()).encode();
            let (key, revision) = put(key, value, format!("issuer `{iss}`")).await?;
            (key, revision, wait)
        }
        Command::Issuer { iss, wait, .. } => delete(&js, &config.name, &kv, Key::Issuer(iss).encode(), wait).await?,
        Command::Keys { iss, jwks: Some(jwks), remove: false, wait } => {
            let jwks = read_jwks(&jwks)?;
            let key = Key::Keys(iss.clone()).encode();
            let (key, revision) =
                put(key, serde_json::to_vec(&jwks)?, format!("{} keys for `{iss}`", jwks.keys.len())).await?;
            (key, revision, wait)
        }
        Command::Keys { iss, wait, .. } => delete(&js, &config.name, &kv, Key::Keys(iss).encode(), wait).await?,
        Command::PutData { id, file, wait } => {
            let bytes = std::fs::read(&file).with_context(|| format!("cannot read `{}`", file.display()))?;
            let value = serde_json::from_slice::<serde_json::Value>(&bytes)
                .with_context(|| format!("`{}` is not JSON", file.display()))?;
            // Every version that serves is kept by the digest decision records name it by (its
            // compact text, as the sidecars read it), for replay; before any sidecar can serve it.
            let data = sandgate_runtime::PolicyData::new(value, 0);
            let what = format!("the data document `{}`", file.display());
            store_object(&js, &config, data.text().as_bytes(), &what).await?;
            let key = Key::Data(id).encode();
            let revision = kv.put(&key, bytes.into()).await.context("the write failed")?;
            eprintln!("{key} at revision {revision}");
            (key, revision, wait)
        }
        Command::Revoke { target, until, wait } => {
            let until = until.as_deref().map(parse_until).transpose()?;
            let key = target.key().encode();
            let revision = kv
                .put(&key, serde_json::to_vec(&RevocationItem { until })?.into())
                .await
                .context("the write failed")?;
            eprintln!("revoked ({key}) at revision {revision}");
            (key, revision, wait)
        }
        Command::RemovePolicy { id, wait } => delete(&js, &config.name, &kv, Key::Policy(id).encode(), wait).await?,
        Command::Unrevoke { target, wait } => delete(&js, &config.name, &kv, target.key().encode(), wait).await?,
    };
    println!("{revision}");
    match wait.timeout()? {
        // Bounded as a whole, whatever NATS does.
        Some(timeout) => tokio::time::timeout(
            timeout + Duration::from_secs(5),
            wait_for(&js, &config.name, &key, revision, timeout, written),
        )
        .await
        .unwrap_or_else(|_| bail!("no answer from NATS within {timeout:?}")),
        None => Ok(ExitCode::SUCCESS),
    }
}

async fn delete(
    js: &async_nats::jetstream::Context,
    fleet: &str,
    kv: &async_nats::jetstream::kv::Store,
    key: String,
    wait: Wait,
) -> anyhow::Result<(String, u64, Wait)> {
    kv.delete(&key).await.context("the delete failed")?;
    // The delete's own revision is not returned; the bucket's last one, asked now, is at least it.
    let revision = sandgate_server::fleet::last_revision(js, fleet).await.context("cannot read the bucket")?;
    eprintln!("removed {key} (bucket at revision {revision})");
    Ok((key, revision, wait))
}

/// Check that the sidecars will load `module` and name it by digest: an `oci://` reference
/// pinned to its manifest digest, or a file uploaded into the fleet's object store.
async fn checked_module(
    js: &async_nats::jetstream::Context,
    config: &FleetConfig,
    module: &str,
    registry: &super::registry::RegistryArgs,
) -> anyhow::Result<String> {
    if !ModuleRef::is_oci(module) {
        return upload(js, config, std::path::Path::new(module)).await;
    }
    let reference: ModuleRef = module.parse()?;
    let pulled = registry.registry(&reference, None)?.pull(&reference, TagFallback::Never).await?;
    super::small_runtime()?
        .load(&pulled.module)
        .map_err(|e| anyhow::anyhow!(e))
        .with_context(|| format!("`{module}` is not a loadable policy component"))?;
    Ok(pulled.pinned().to_string())
}

/// Upload the policy component `file` into the fleet's object store under its digest; its
/// reference, `fleet:sha256:…`.
async fn upload(
    js: &async_nats::jetstream::Context,
    config: &FleetConfig,
    file: &std::path::Path,
) -> anyhow::Result<String> {
    let component = super::read(file, "policy")?;
    super::small_runtime()?
        .load(&component)
        .map_err(|e| anyhow::anyhow!(e))
        .with_context(|| format!("`{}` is not a loadable policy component", file.display()))?;
    let digest = store_object(js, config, &component, &file.display().to_string()).await?;
    Ok(format!("{FLEET_OBJECT}{digest}"))
}

/// Keep `bytes` (`what`, for messages) in the fleet's object store under their digest, which
/// is returned; the store is created by the first upload.
async fn store_object(
    js: &async_nats::jetstream::Context,
    config: &FleetConfig,
    bytes: &[u8],
    what: &str,
) -> anyhow::Result<String> {
    let digest = sandgate_registry::sha256_digest(bytes);
    let bucket = sandgate_server::fleet::objects_bucket(&config.name);
    let store = match js.get_object_store(&bucket).await {
        Ok(store) => store,
        Err(_) => js
            .create_object_store(async_nats::jetstream::object_store::Config {
                bucket: bucket.clone(),
                description: Some(format!("policy modules and data documents of fleet `{}`, by digest", config.name)),
                num_replicas: config.replicas,
                storage: async_nats::jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .with_context(|| format!("cannot create the object store `{bucket}`"))?,
    };
    // Content-addressed: an object already there under this digest is these bytes.
    let present = store.info(&digest).await.is_ok_and(|info| !info.deleted && info.size == bytes.len());
    if !present {
        let mut reader = bytes;
        store
            .put(digest.as_str(), &mut reader)
            .await
            .with_context(|| format!("cannot upload {what} into `{bucket}`"))?;
    }
    eprintln!(
        "{} {what} ({} bytes) {} the fleet's object store",
        if present { "found" } else { "uploaded" },
        bytes.len(),
        if present { "in" } else { "into" }
    );
    Ok(digest)
}

fn read_jwks(file: &std::path::Path) -> anyhow::Result<jsonwebtoken::jwk::JwkSet> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read `{}`", file.display()))?;
    let jwks: jsonwebtoken::jwk::JwkSet =
        serde_json::from_slice(&bytes).with_context(|| format!("`{}` is not a JWKS", file.display()))?;
    if jwks.keys.iter().any(|k| matches!(k.algorithm, jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_))) {
        bail!(
            "`{}` holds a shared secret (`oct`): every reader of the fleet's bucket could sign tokens with it; \
             configure secrets in each sidecar's [[issuers]]",
            file.display()
        );
    }
    let keys = sandgate_auth::keys_from_jwks(&jwks, false)?;
    if keys.is_empty() {
        bail!("`{}` has no keys", file.display());
    }
    Ok(jwks)
}

async fn desired_store(
    js: &async_nats::jetstream::Context,
    fleet: &str,
    replicas: usize,
) -> anyhow::Result<async_nats::jetstream::kv::Store> {
    let name = sandgate_server::fleet::bucket(fleet);
    Ok(sandgate_server::fleet::open_or_create_bucket(
        js,
        &name,
        16,
        Duration::ZERO,
        async_nats::jetstream::stream::StorageType::File,
        replicas,
    )
    .await?)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Watch the status bucket until every live sidecar reports `revision` (or later).
async fn wait_for(
    js: &async_nats::jetstream::Context,
    fleet: &str,
    key: &str,
    revision: u64,
    timeout: Duration,
    began: Instant,
) -> anyhow::Result<ExitCode> {
    let store =
        status_store(js, fleet, 1).await.map_err(|e| anyhow::anyhow!(e)).context("cannot open the status bucket")?;
    let deadline = Instant::now() + timeout;
    // A cluster that lost a node can place the watch's consumer on it and never answer, or
    // time out its creation while it moves a stream's leadership: each try is bounded
    // (`ConsumerTries`), and tried again until the deadline.
    let mut tries = sandgate_server::fleet::ConsumerTries::default();
    let mut updates = loop {
        let failed = match tries.attempt(store.watch_all()).await {
            Some(Ok(updates)) => break updates,
            Some(Err(e)) => e.to_string(),
            None => "its consumer was not created in time".to_owned(),
        };
        if Instant::now() + Duration::from_millis(250) >= deadline {
            bail!("cannot watch the status bucket: {failed}")
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Every status there is now (the watch, started first, brings every later change).
    let mut nodes = read_statuses(js, fleet, &store).await?;
    let mut first = true;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let next = if first {
            first = false;
            Err(())
        } else {
            tokio::time::timeout(remaining, updates.next()).await.map_err(|_| ())
        };
        match next {
            Ok(Some(Ok(entry))) => match serde_json::from_slice::<NodeStatus>(&entry.value) {
                Ok(status) if entry.operation == async_nats::jetstream::kv::Operation::Put => {
                    let newer = nodes.get(&entry.key).is_none_or(|old| old.heartbeat_ms <= status.heartbeat_ms);
                    if newer {
                        nodes.insert(entry.key.clone(), status);
                    }
                }
                _ => {
                    nodes.remove(&entry.key);
                }
            },
            Ok(Some(Err(e))) => bail!("the status watch failed: {e}"),
            Ok(None) => bail!("the status watch ended"),
            Err(()) => {} // the first look, or nothing more in time
        }
        let now = now_ms();
        let live: Vec<&NodeStatus> = nodes.values().filter(|s| s.is_live(now)).collect();
        let behind: Vec<&&NodeStatus> = live.iter().filter(|s| s.applied_revision < revision).collect();
        if live.is_empty() {
            // Nothing confirmed the write yet: a sidecar may be reconnecting; at the deadline,
            // a wrong fleet name or every sidecar away.
            if Instant::now() >= deadline {
                eprintln!("no live sidecar in fleet `{fleet}` confirmed revision {revision} within {timeout:?}");
                return Ok(ExitCode::from(1));
            }
            continue;
        }
        if behind.is_empty() {
            let failed: Vec<(&str, &str)> = live
                .iter()
                .flat_map(|s| {
                    s.errors
                        .iter()
                        .filter(|e| e.key == key && e.revision == revision)
                        .map(|e| (s.node.as_str(), e.error.as_str()))
                })
                .collect();
            let took = began.elapsed();
            for (node, error) in &failed {
                eprintln!("{node}: not applied: {error}");
            }
            if !failed.is_empty() {
                eprintln!("{} of {} live sidecars refused revision {revision}", failed.len(), live.len());
                return Ok(ExitCode::from(1));
            }
            eprintln!(
                "applied by all {} live sidecars {:.1} ms after the write began",
                live.len(),
                took.as_secs_f64() * 1000.0
            );
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() >= deadline {
            for s in &behind {
                eprintln!(
                    "{}: at revision {} (wants {revision}){}",
                    s.node,
                    s.applied_revision,
                    if s.stale { ", stale" } else { "" }
                );
            }
            eprintln!(
                "{} of {} live sidecars had not applied revision {revision} after {timeout:?}",
                behind.len(),
                live.len()
            );
            return Ok(ExitCode::from(1));
        }
    }
}

/// Every sidecar's status now. The keys come from the stream's subjects (a bounded answer;
/// a key listing would chase the heartbeats that keep arriving), each read by a direct get.
async fn read_statuses(
    js: &async_nats::jetstream::Context,
    fleet: &str,
    store: &async_nats::jetstream::kv::Store,
) -> anyhow::Result<BTreeMap<String, NodeStatus>> {
    let bucket = sandgate_server::fleet::status_bucket(fleet);
    let prefix = format!("$KV.{bucket}.");
    let stream = js.get_stream(format!("KV_{bucket}")).await.context("cannot open the status bucket")?;
    let mut subjects =
        stream.info_with_subjects(format!("{prefix}>")).await.context("cannot list the status bucket")?;
    let mut nodes = BTreeMap::new();
    while let Some(subject) = subjects.next().await {
        let (subject, _) = subject.context("cannot list the status bucket")?;
        let Some(key) = subject.strip_prefix(&prefix) else { continue };
        if let Some(status) = store.get(key).await.ok().flatten().and_then(|v| serde_json::from_slice(&v).ok()) {
            nodes.insert(key.to_owned(), status);
        }
    }
    Ok(nodes)
}

async fn status(js: &async_nats::jetstream::Context, fleet: &str, replicas: usize) -> anyhow::Result<ExitCode> {
    let revision = sandgate_server::fleet::last_revision(js, fleet).await.unwrap_or(0);
    let store = status_store(js, fleet, replicas).await.map_err(|e| anyhow::anyhow!(e))?;
    let nodes = read_statuses(js, fleet, &store).await?;
    let now = now_ms();
    println!("fleet `{fleet}` at revision {revision}");
    println!("{:<24} {:>9} {:>6} {:>6} {:>8}  errors", "node", "applied", "synced", "stale", "age ms");
    for s in nodes.values() {
        let age = now.saturating_sub(s.heartbeat_ms);
        let errors: Vec<String> = s.errors.iter().map(|e| format!("{}@{}: {}", e.key, e.revision, e.error)).collect();
        println!(
            "{:<24} {:>9} {:>6} {:>6} {:>8}  {}{}",
            s.node,
            s.applied_revision,
            s.synced,
            s.stale,
            age,
            errors.join("; "),
            if s.is_live(now) { "" } else { " (not live)" }
        );
    }
    Ok(ExitCode::SUCCESS)
}
