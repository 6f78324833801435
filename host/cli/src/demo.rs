//! The built-in demo of `sandgate serve` without a configuration: the bundled RBAC policy, a
//! freshly generated ES256 key, and a token to try it with.

use anyhow::Context;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use sandgate_auth::{IssuerConfig, KeySource};
use sandgate_server::config::{
    Config, ModuleSource, PolicyConfig, ProxyKind, RevocationConfig, RuntimeLimits, ServerConfig,
};
use std::path::{Path, PathBuf};

/// The demo issuer.
pub const ISSUER: &str = "https://demo.sandgate.invalid";
/// The demo audience.
pub const AUDIENCE: &str = "demo-api";
const DATA: &str = include_str!("../../../examples/rbac-data.json");

/// A demo configuration, its key files written under `dir`, and a token for `alice`
/// (role `reader`) valid for a day.
pub fn demo(dir: &Path, policy: PathBuf, listen: &str) -> anyhow::Result<(Config, String)> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|_| anyhow::anyhow!("cannot generate a key"))?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
        .map_err(|_| anyhow::anyhow!("bad key"))?;
    let point = pair.public_key().as_ref();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwk = serde_json::json!({ "kty": "EC", "crv": "P-256", "kid": "demo", "alg": "ES256", "use": "sig",
        "x": b64(&point[1..33]), "y": b64(&point[33..65]) });
    let jwks_path = dir.join("demo-jwks.json");
    std::fs::write(&jwks_path, serde_json::json!({ "keys": [jwk] }).to_string())?;
    let data_path = dir.join("rbac-data.json");
    std::fs::write(&data_path, DATA)?;

    let now = sandgate_server::unix_now();
    let claims = serde_json::json!({ "iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "roles": ["reader"],
        "iat": now, "exp": now + 86_400, "jti": "demo-token-1" });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("demo".into());
    let token = jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()))
        .context("cannot sign the demo token")?;

    let config = Config {
        server: ServerConfig {
            listen: listen.to_owned(),
            // The demo is asked directly, the way Envoy asks: the original path follows
            // `/auth`, with the original method.
            proxy: Some(ProxyKind::Envoy),
            default_policy: Some("rbac".into()),
            identity_headers: [("x-auth-subject".to_owned(), "sub".to_owned())].into(),
            ..ServerConfig::default()
        },
        runtime: RuntimeLimits::default(),
        issuers: vec![IssuerConfig {
            issuer: ISSUER.into(),
            audiences: vec![AUDIENCE.into()],
            algorithms: vec!["ES256".into()],
            leeway_secs: 30,
            keys: vec![KeySource {
                kid: None,
                algorithm: None,
                pem_file: None,
                jwk_file: None,
                jwks_file: Some(jwks_path),
                secret: None,
            }],
            jwks_url: None,
            discovery_url: None,
            jwks_refresh_secs: 300,
            jwks_min_refetch_ms: 10_000,
            jwks_max_stale_secs: None,
        }],
        policies: vec![PolicyConfig { id: "rbac".into(), module: ModuleSource::File(policy), data: Some(data_path) }],
        routes: Vec::new(),
        revocations: RevocationConfig::default(),
        admin: None,
        grpc: None,
        registry: Default::default(),
        fleet: None,
        decision_log: Default::default(),
        tracing: None,
    };
    Ok((config, token))
}

/// Where the bundled RBAC policy is: `target/policies/rbac.wasm` beside the binary's
/// `target/release`, or under the current directory.
pub fn bundled_policy() -> anyhow::Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(target) = exe.parent().and_then(Path::parent)
    {
        candidates.push(target.join("policies/rbac.wasm"));
    }
    candidates.push(PathBuf::from("target/policies/rbac.wasm"));
    candidates.iter().find(|p| p.is_file()).cloned().with_context(|| {
        format!("the bundled RBAC policy is not built (looked at {candidates:?}); run scripts/build-policies.sh")
    })
}
