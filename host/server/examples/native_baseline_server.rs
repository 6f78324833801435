//! The load benchmark's native baseline: Sandgate's own server (HTTP, JWT verification,
//! snapshot, decision log) with the RBAC example's logic compiled into the host instead of run
//! in a fresh Wasm instance. Isolation is off: for comparison only.
//!
//! Run: `cargo run --release -p sandgate-server --features bench-internals --example native_baseline_server -- CONFIG.toml 127.0.0.1:9000`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "an example: a failed set-up should stop it loudly"
)]

use sandgate_policy_sdk as sdk;
use sandgate_policy_sdk::Policy;
use sandgate_runtime::PolicyData;
use sandgate_runtime::bindings::sandgate::policy::types as host;
use sandgate_server::decide::NativePolicy;
use sandgate_server::{Config, Sidecar};
use std::sync::Arc;

/// The shipped binary's allocator (host/cli/src/main.rs), so the comparison is like for like.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn to_sdk(r: &host::CheckRequest) -> sdk::Request {
    let credential = match &r.credential {
        host::Credential::None => sdk::Credential::None,
        host::Credential::Rejected(e) => {
            sdk::Credential::Rejected(sdk::CredentialError { reason: e.reason.clone(), message: e.message.clone() })
        }
        host::Credential::Verified(v) => sdk::Credential::Verified(sdk::VerifiedCredential {
            key_id: v.key_id.clone(),
            algorithm: v.algorithm.clone(),
            claims: sdk::StandardClaims {
                issuer: v.claims.issuer.clone(),
                subject: v.claims.subject.clone(),
                audiences: v.claims.audiences.clone(),
                expires_at: v.claims.expires_at,
                issued_at: v.claims.issued_at,
                token_id: v.claims.token_id.clone(),
                scopes: v.claims.scopes.clone(),
                roles: v.claims.roles.clone(),
            },
            claims_json: v.claims_json.clone(),
        }),
    };
    sdk::Request::from_parts(sdk::RequestParts {
        request_id: r.request_id.clone(),
        method: r.method.clone(),
        scheme: r.scheme.clone(),
        host: r.host.clone(),
        path: r.path.clone(),
        query: r.query.clone(),
        headers: r.headers.iter().map(|h| sdk::Header { name: h.name.clone(), value: h.value.clone() }).collect(),
        peer: r.peer.clone(),
        body: r.body.clone(),
        credential,
        now: r.now,
        versions: sdk::SnapshotVersions {
            snapshot: r.versions.snapshot,
            policy_digest: r.versions.policy_digest.clone(),
            key_set: r.versions.key_set,
            revocations: r.versions.revocations,
            data: r.versions.data,
        },
    })
}

fn from_sdk(d: sdk::Decision) -> host::Decision {
    let headers =
        |hs: Vec<sdk::Header>| hs.into_iter().map(|h| host::Header { name: h.name, value: h.value }).collect();
    match d {
        sdk::Decision::Allow(a) => host::Decision::Allow(host::AllowResponse {
            set_headers: headers(a.set_headers),
            remove_headers: a.remove_headers,
        }),
        sdk::Decision::Deny(d) => host::Decision::Deny(host::DenyResponse {
            status: d.status,
            reason: d.reason,
            message: d.message,
            headers: headers(d.headers),
        }),
    }
}

thread_local! {
    static DATA_VERSION: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

fn rbac(request: &host::CheckRequest, data: &PolicyData) -> host::Decision {
    // The SDK's native data stand-in is per thread: load the document once per thread.
    if DATA_VERSION.get() != Some(data.version) {
        sdk::testing::set_data(data.value.clone());
        DATA_VERSION.set(Some(data.version));
    }
    from_sdk(sandgate_policy_rbac::Rbac::check(&to_sdk(request)))
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let config_path =
        args.next().ok_or_else(|| anyhow::anyhow!("usage: native_baseline_server CONFIG.toml [ADDRESS]"))?;
    let mut config = Config::from_file(std::path::Path::new(&config_path))?;
    if let Some(address) = args.next() {
        config.server.listen = address;
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(async {
        let native: NativePolicy = Arc::new(rbac);
        let sidecar = Sidecar::build(config).await?.with_native_baseline(native);
        eprintln!("native_baseline_server: listening on http://{}", sidecar.http_address());
        sidecar.run(std::future::pending()).await;
        Ok::<_, anyhow::Error>(())
    })
}
