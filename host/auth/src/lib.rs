//! Sandgate's token verification: issuers, key sets, the JWKS fetcher, the verified-token
//! cache and revocations. It knows nothing of WebAssembly or of the HTTP server: the server
//! hands it a bearer token and the key sets and revocations it pinned, and gets a
//! [`VerifiedToken`] or a [`Rejection`] with its reason code back.
//!
//! - [`IssuerConfig`]: how an issuer is configured (embedded in the server's configuration).
//! - [`keys`]: [`Key`], [`Issuer`], [`KeySets`], [`Revocations`]; [`KeyError`].
//! - [`verify`]: [`KeySets::verify`], [`KeySets::verify_signature`], [`check_revocation`],
//!   [`Rejection`].
//! - [`jwks_fetcher`]: single-flight, rate-limited JWKS fetching into a [`KeyStore`].
//! - [`token_cache`]: verified tokens by SHA-256 and key-set version.

mod config;
mod credential;
pub mod jwks_fetcher;
pub mod keys;
pub mod token_cache;
pub mod verify;

pub use config::{IssuerConfig, KeySource};
pub use credential::VerifiedToken;
pub use jwks_fetcher::{FetchError, JwksFetcher, KeyStore};
pub use keys::{Issuer, Key, KeyError, KeySets, Revocations, keys_from_jwks, parse_algorithm};
pub use token_cache::TokenCache;
pub use verify::{Rejection, check_revocation};

/// The time now, Unix seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// An error with its sources, `: `-separated, for log lines.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
