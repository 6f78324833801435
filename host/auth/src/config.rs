//! How an issuer is configured: its rules, static keys and JWKS endpoint. Plain data that
//! deserialises from any serde format; the server's configuration file embeds it.

use serde::Deserialize;
use std::path::PathBuf;

/// One token issuer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The exact `iss` its tokens carry.
    pub issuer: String,
    /// Accepted audiences; a token must name one. Empty: `aud` is not checked.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Accepted algorithms, e.g. `["RS256", "ES256"]`. `none` is never accepted.
    pub algorithms: Vec<String>,
    /// Clock leeway for `exp`/`nbf`, in seconds.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// Static keys.
    #[serde(default)]
    pub keys: Vec<KeySource>,
    /// A JWKS URL fetched at start, periodically, and on an unknown `kid`.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// An OIDC issuer whose `/.well-known/openid-configuration` names the JWKS URL.
    #[serde(default)]
    pub discovery_url: Option<String>,
    /// Periodic JWKS refresh, in seconds.
    #[serde(default = "default_refresh")]
    pub jwks_refresh_secs: u64,
    /// How long keys fetched from the JWKS endpoint stay trusted after the last successful
    /// fetch, in seconds; past it tokens signed with them are refused (`jwks_stale`) until a
    /// fetch succeeds. Absent: they stay trusted until replaced.
    #[serde(default)]
    pub jwks_max_stale_secs: Option<u64>,
    /// Minimum time between fetches triggered by unknown `kid`s, in milliseconds.
    #[serde(default = "default_min_refetch")]
    pub jwks_min_refetch_ms: u64,
}

fn default_leeway() -> u64 {
    30
}
fn default_refresh() -> u64 {
    300
}
fn default_min_refetch() -> u64 {
    10_000
}

/// Where a static key comes from. Exactly one of the fields is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySource {
    /// The `kid` tokens name this key by (JWKs carry their own).
    #[serde(default)]
    pub kid: Option<String>,
    /// Algorithm of a PEM key or secret, e.g. `RS256` (JWKs may carry their own `alg`).
    #[serde(default)]
    pub algorithm: Option<String>,
    /// A PEM public key file (RSA, EC or Ed25519).
    #[serde(default)]
    pub pem_file: Option<PathBuf>,
    /// A file with one JWK.
    #[serde(default)]
    pub jwk_file: Option<PathBuf>,
    /// A JWKS file.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// An HMAC secret (HS256/384/512), given inline.
    #[serde(default)]
    pub secret: Option<String>,
}
