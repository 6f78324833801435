//! `sandgate replay RECORDS… --archive DIR [--candidate ID=FILE.wasm]`: decide recorded
//! checks again, offline, from decision records captured with `capture = "input"`.
//!
//! Without a candidate, every record must come out as it was recorded: a difference means a
//! check was not the pure function it is promised to be (exit 1). With a candidate, the
//! differences are the decisions the candidate would change, grouped by policy and answer
//! (exit 1 when there is any, for gating a roll-out in CI). A replay that proves less than it
//! seems to (nothing replayed, or records that could not be: a module no archive holds, an
//! unreadable line) exits 3 unless `--allow-skipped`: a gate must not pass on a candidate id
//! no record names, or on an archive that holds nothing.

use anyhow::{Context, bail};
use sandgate_records::replay::{Change, Wanted};
use sandgate_records::{Record, Replayer, Report};
use sandgate_registry::Cache;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// Decision-record files (one JSON object a line; `-` for standard input).
    #[arg(required_unless_present = "stream")]
    records: Vec<PathBuf>,
    /// Read the records of this JetStream stream (`[decision_log.nats] stream`), from its first
    /// message to the last one it held when the replay started, instead of (or besides) files.
    #[arg(long, requires = "nats_url")]
    stream: Option<String>,
    /// The NATS server(s) of `--stream`, comma-separated.
    #[arg(long)]
    nats_url: Option<String>,
    /// A file holding a NATS token, for `--nats-url` and `--fleet-url`.
    #[arg(long)]
    nats_token_file: Option<PathBuf>,
    /// A file holding an nkey seed, for `--nats-url` and `--fleet-url`.
    #[arg(long)]
    nats_nkey_seed_file: Option<PathBuf>,
    /// NATS user, for `--nats-url` and `--fleet-url` (the password from `SANDGATE_NATS_PASSWORD`).
    #[arg(long)]
    nats_user: Option<String>,
    /// A CA (PEM) for the NATS servers (implies TLS).
    #[arg(long)]
    nats_ca_file: Option<PathBuf>,
    /// Memory cap of one policy instance, in MiB: the sidecar's `[runtime] memory_limit_mib`
    /// (from `--config` if given there; else 16). A check that ran out of memory live must
    /// run out here too, and one that did not must not.
    #[arg(long)]
    memory_limit_mib: Option<usize>,
    /// Time budget of one policy call, in milliseconds: the sidecar's `[runtime] timeout_ms`
    /// (from `--config` if given there; else 100).
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// A directory holding modules and data documents by digest (the sidecar's
    /// `[decision_log] archive_dir`, or a module cache); repeatable, searched in order.
    #[arg(long = "archive", required = true)]
    archives: Vec<PathBuf>,
    /// Run this module for policy `ID` instead of the recorded one: the impact of a change.
    #[arg(long, value_name = "ID=FILE.wasm")]
    candidate: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Exit 0 (not 3) when nothing differs even though nothing was replayed, or some records
    /// could not be (a module or data document no archive holds, an unreadable line).
    #[arg(long)]
    allow_skipped: bool,
    /// Fetch a module no archive has from where its record says it came from: an
    /// `oci://…@sha256:…` source from its registry (the flags below), a `fleet:sha256:…` source
    /// from the fleet's object store (`--fleet-url`, `--fleet`). With a fleet named, a data
    /// document no archive has is fetched from its object store too.
    #[arg(long)]
    fetch: bool,
    /// A registry (`host[:port]`) `--fetch` may pull modules from; repeatable. A record naming
    /// any other registry is not fetched: records are data anyone who can write them chooses,
    /// and the registry flags' credentials go only to the registries named here.
    #[arg(long = "fetch-from", value_name = "REGISTRY", requires = "fetch")]
    fetch_from: Vec<String>,
    /// The fleet's NATS server(s), for `fleet:` modules.
    #[arg(long, requires = "fleet")]
    fleet_url: Option<String>,
    /// The fleet's name, for `fleet:` modules.
    #[arg(long, requires = "fleet_url")]
    fleet: Option<String>,
    #[command(flatten)]
    registry: super::registry::RegistryArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let io = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let runtime = sandgate_runtime::Runtime::new(limits(&args)?)?;
    // Archives are read, never changed: a damaged file is a miss and stays where it is.
    let archives = args.archives.iter().map(|dir| Cache::new(dir).keeping_damaged()).collect();
    let mut replayer = Replayer::new(&runtime, archives);
    let candidate = match &args.candidate {
        Some(spec) => {
            let Some((id, file)) = spec.split_once('=') else {
                bail!("--candidate takes ID=FILE.wasm, not `{spec}`");
            };
            let module = super::load(&runtime, std::path::Path::new(file))?;
            replayer = replayer.with_candidate(id.to_owned(), module);
            Some(id.to_owned())
        }
        None => None,
    };
    if args.fetch && args.registry.reads_stdin() && args.records.iter().any(|p| p.as_os_str() == "-") {
        bail!("--password-stdin and records from `-` would both read standard input");
    }
    let nats_at = |url: &str, name: &str| nats_config(&args, url, name);
    if args.fetch {
        let fleet = match (&args.fleet_url, &args.fleet) {
            (Some(url), Some(name)) => Some(nats_at(url, name)?),
            _ => None,
        };
        let (registry, io) = (&args.registry, &io);
        let allowed = &args.fetch_from;
        let mut nats: Option<async_nats::Client> = None;
        replayer = replayer.with_fetch(Box::new(move |digest, wanted| match wanted {
            Wanted::Module { source } => {
                let fetched = io.block_on(fetch(digest, source, registry, allowed, fleet.as_ref(), &mut nats));
                fetched.map_err(|e| eprintln!("cannot fetch {digest} from `{source}`: {e:#}")).ok()
            }
            // A data document only from the fleet's object store (`sandgate fleet put-data`
            // keeps every version there), when a fleet is named.
            Wanted::Data => {
                let limit = sandgate_records::replay::MAX_BLOB;
                let fetched = io.block_on(fleet_object(digest, fleet.as_ref()?, &mut nats, limit));
                fetched.map_err(|e| eprintln!("cannot fetch data {digest} from the fleet's object store: {e:#}")).ok()
            }
        }));
    }
    let mut report = Report::default();
    let mut replay_line = |line: &[u8]| match serde_json::from_slice::<Record>(line) {
        Ok(record) => {
            let verdict = replayer.replay(&record);
            report.add(&record, &verdict);
        }
        Err(_) => report.unreadable(),
    };
    if let (Some(stream), Some(url)) = (&args.stream, &args.nats_url) {
        read_stream(&io, &nats_at(url, "replay")?, stream, &mut replay_line)?;
    }
    for path in &args.records {
        let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
            Box::new(std::io::stdin().lock())
        } else {
            let file = std::fs::File::open(path).with_context(|| format!("cannot read `{}`", path.display()))?;
            Box::new(std::io::BufReader::new(file))
        };
        // Lines as bytes: one that is not UTF-8 is an unreadable record, not the end of the replay.
        for line in reader.split(b'\n') {
            let line = line.with_context(|| format!("cannot read `{}`", path.display()))?;
            if line.trim_ascii().is_empty() {
                continue;
            }
            replay_line(&line);
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, candidate.as_deref());
    }
    if report.differ > 0 {
        return Ok(ExitCode::from(1));
    }
    match report.incomplete() {
        Some(why) if !args.allow_skipped => {
            let whose = candidate.map(|id| format!(" of policy `{id}`")).unwrap_or_default();
            eprintln!("replay incomplete{whose}: {why} (exit 3; --allow-skipped accepts it)");
            Ok(ExitCode::from(3))
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

fn print_report(report: &Report, candidate: Option<&str>) {
    let verb = if candidate.is_some() { "would change" } else { "differ" };
    println!(
        "{} records, {} replayed: {} the same, {} {verb}",
        report.records, report.replayed, report.same, report.differ
    );
    for (why, count) in &report.skipped {
        println!("  not replayed ({why}): {count}");
    }
    for (change, Change { count, examples }) in &report.changes {
        println!("{count:>8}  {}", printable(change));
        for e in examples {
            println!("          e.g. {} {}", printable(&e.request_id), printable(&e.request));
        }
    }
    if report.replayed == 0 {
        println!(
            "nothing was replayed: records need `capture = \"input\"` and an archive holding their modules and data"
        );
    }
}

/// `text` (from a record: whoever wrote it chose it) with control characters, line and paragraph
/// separators and bidirectional controls escaped, so that it cannot start a line of its own in
/// the report, reorder what follows it, or drive the terminal.
fn printable(text: &str) -> String {
    let hidden = |c: char| {
        c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    text.chars().flat_map(|c| if hidden(c) { c.escape_default().collect() } else { vec![c] }).collect()
}

/// The runtime's limits: the flags, else the `[runtime]` section of `--config`, else the
/// sidecar's defaults. One instance at a time.
fn limits(args: &Args) -> anyhow::Result<sandgate_runtime::RuntimeConfig> {
    let configured = match args.registry.config() {
        Some(path) => sandgate_server::Config::from_file(path)?.runtime,
        None => sandgate_server::config::RuntimeLimits::default(),
    };
    let memory_limit_mib = args.memory_limit_mib.unwrap_or(configured.memory_limit_mib);
    let timeout_ms = args.timeout_ms.unwrap_or(configured.timeout_ms);
    if memory_limit_mib == 0 || timeout_ms == 0 {
        bail!("--memory-limit-mib and --timeout-ms must be above 0");
    }
    eprintln!("policies run with memory_limit_mib = {memory_limit_mib} and timeout_ms = {timeout_ms}");
    Ok(sandgate_runtime::RuntimeConfig {
        max_instances: 1,
        memory_limit: memory_limit_mib << 20,
        timeout: std::time::Duration::from_millis(timeout_ms),
        ..Default::default()
    })
}

/// How to reach the NATS server(s) at `url`, with the credential flags.
fn nats_config(args: &Args, url: &str, name: &str) -> anyhow::Result<sandgate_server::config::FleetConfig> {
    let mut config = sandgate_server::config::FleetConfig::client(url, name);
    if let Some(user) = &args.nats_user {
        config.user = Some(user.clone());
        config.password = Some(super::password(false, "SANDGATE_NATS_PASSWORD", "--nats-user")?);
    }
    config.token_file = args.nats_token_file.clone();
    config.nkey_seed_file = args.nats_nkey_seed_file.clone();
    config.ca_file = args.nats_ca_file.clone();
    Ok(config)
}

/// Every record of JetStream stream `name` (messages of whole lines), from the first message to
/// the last it held when this started, in order: records published meanwhile are not waited
/// for, so a replay of a stream that never stops growing ends. `each` runs outside `io`'s
/// futures, so it may block on `io` itself (a fetch).
fn read_stream(
    io: &tokio::runtime::Runtime,
    config: &sandgate_server::config::FleetConfig,
    name: &str,
    each: &mut impl FnMut(&[u8]),
) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    let Some((mut messages, last)) = io.block_on(open_stream(config, name))? else { return Ok(()) };
    loop {
        let next =
            io.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(30), messages.next()).await });
        let message = next
            .context("the stream stopped delivering")?
            .context("the stream ended")?
            .map_err(|e| anyhow::anyhow!("cannot read the stream: {e}"))?;
        // A message holds whole records, one a line, perhaps compressed.
        let encoding = message.headers.as_ref().and_then(|h| h.get(sandgate_server::log_sink::CONTENT_ENCODING));
        let lines = sandgate_server::log_sink::decode_message(encoding.map(|e| e.as_str()), &message.payload)
            .map_err(anyhow::Error::msg)?;
        for line in lines.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            each(line);
        }
        let info = message.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        if info.stream_sequence >= last || info.pending == 0 {
            return Ok(());
        }
    }
}

/// The messages of stream `name` from its first, and the sequence of its last now; `None` if
/// it holds none.
async fn open_stream(
    config: &sandgate_server::config::FleetConfig,
    name: &str,
) -> anyhow::Result<Option<(async_nats::jetstream::consumer::pull::Ordered, u64)>> {
    let client = sandgate_server::fleet::connect(config, true).await?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(name).await.with_context(|| format!("no stream `{name}`"))?;
    let state = &stream.info().await.context("cannot read the stream")?.state;
    if state.messages == 0 {
        return Ok(None);
    }
    let last = state.last_sequence;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .context("cannot read the stream")?;
    let messages = consumer.messages().await.context("cannot read the stream")?;
    Ok(Some((messages, last)))
}

/// Object `digest` (at most `limit` bytes) from the fleet's object store, over `nats`,
/// connected on first use.
async fn fleet_object(
    digest: &str,
    fleet: &sandgate_server::config::FleetConfig,
    nats: &mut Option<async_nats::Client>,
    limit: u64,
) -> anyhow::Result<Vec<u8>> {
    if nats.is_none() {
        *nats = Some(sandgate_server::fleet::connect(fleet, true).await?);
    }
    let client = nats.as_ref().context("no NATS client")?;
    sandgate_server::fleet::fetch_object(client, &fleet.name, digest, limit).await.map_err(anyhow::Error::msg)
}

/// Module `digest` from `source`: its OCI registry, if it is one of `allowed` (pulled by
/// digest, verified), or the fleet's object store (checked against the digest).
async fn fetch(
    digest: &str,
    source: &str,
    registry: &super::registry::RegistryArgs,
    allowed: &[String],
    fleet: Option<&sandgate_server::config::FleetConfig>,
    nats: &mut Option<async_nats::Client>,
) -> anyhow::Result<Vec<u8>> {
    if sandgate_registry::ModuleRef::is_oci(source) {
        let reference: sandgate_registry::ModuleRef = source.parse()?;
        // The source is the record's: its registry is contacted, and given credentials, only if
        // the operator named it.
        if !allowed.iter().any(|r| r.eq_ignore_ascii_case(reference.registry())) {
            anyhow::bail!("`{}` is not a registry given with --fetch-from", reference.registry());
        }
        let pulled =
            registry.registry(&reference, None)?.pull(&reference, sandgate_registry::TagFallback::Never).await?;
        return Ok(pulled.module.to_vec());
    }
    if source.strip_prefix("fleet:") == Some(digest) {
        let Some(config) = fleet else {
            anyhow::bail!("a module from a fleet's object store needs --fleet-url and --fleet");
        };
        let limit = sandgate_registry::RegistrySettings::default().max_module_bytes;
        return fleet_object(digest, config, nats, limit).await;
    }
    anyhow::bail!("no way to fetch a module from `{source}`")
}
