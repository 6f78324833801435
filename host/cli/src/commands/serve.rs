//! `sandgate serve`: config → build → spawn → wait for SIGINT/SIGTERM → drain.

use sandgate_server::{Config, Sidecar};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// The configuration file (TOML); see examples/sandgate.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Listen address, overriding the configuration's.
    #[arg(long)]
    listen: Option<String>,
    /// gRPC (Envoy ext_authz) listen address, overriding the configuration's.
    #[arg(long)]
    grpc_listen: Option<String>,
    /// Never contact an OCI registry: `oci://` modules come from the module cache only.
    #[arg(long)]
    offline: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sigstore=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let (mut config, demo_token) = match args.config {
        Some(path) => (Config::from_file(&path)?, None),
        None => {
            let dir = std::env::temp_dir().join(format!("sandgate-demo-{}", std::process::id()));
            let listen = args.listen.clone().unwrap_or_else(|| "127.0.0.1:8181".into());
            let (config, token) = crate::demo::demo(&dir, crate::demo::bundled_policy()?, &listen)?;
            (config, Some(token))
        }
    };
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if args.offline {
        config.registry.offline = true;
    }
    if let Some(listen) = args.grpc_listen {
        config.grpc.get_or_insert_with(Default::default).listen = listen;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(serve(config, demo_token))
}

async fn serve(config: Config, demo_token: Option<String>) -> anyhow::Result<ExitCode> {
    let auth_prefix = config.server.auth_prefix.clone();
    let sidecar = Sidecar::build(config).await?;
    if let Some(address) = sidecar.admin_address() {
        eprintln!("sandgate: admin API on {address}");
    }
    if let Some(path) = sidecar.generated_admin_token_file() {
        eprintln!("sandgate: admin token (generated, none configured) written to {} (mode 0600)", path.display());
    }
    if let Some(address) = sidecar.grpc_address() {
        eprintln!("sandgate: Envoy ext_authz gRPC on {address}");
    }
    if let Some(address) = sidecar.ops_address() {
        eprintln!("sandgate: /healthz, /readyz and /metrics on http://{address}");
    }
    let address = sidecar.http_address();
    eprintln!("sandgate: listening on http://{address} (checks at {auth_prefix}, /healthz, /readyz, /metrics)");
    if let Some(token) = demo_token {
        let url = format!("http://{address}{auth_prefix}");
        eprintln!(
            "\ndemo: [server] proxy = \"envoy\": the original path follows {auth_prefix}, with the original method"
        );
        eprintln!("\ndemo token (alice, role reader):\n{token}\n");
        eprintln!("allowed (200):  curl -i -H 'Authorization: Bearer {token}' {url}/api/orders/7");
        eprintln!("denied (403):   curl -i -X DELETE -H 'Authorization: Bearer {token}' {url}/api/orders/7");
        eprintln!("no token (401): curl -i {url}/api/orders/7\n");
    }
    sidecar.run(shutdown_signal()).await;
    Ok(ExitCode::SUCCESS)
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending().await,
            }
        } => {}
    }
}
