//! Issuers and their keys by `kid`, and revocations: the immutable, versioned pieces of a
//! snapshot that token verification reads.
//!
//! Every key has exactly one algorithm. A token is accepted only when its header's `alg` is
//! both the key's algorithm and one its issuer allows, so `alg: none` (not an algorithm at
//! all here) and algorithm confusion (an HS256 token "signed" with an RSA public key) fail
//! before any signature check.

use crate::config::{IssuerConfig, KeySource};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

/// Why a key or an issuer could not be built from its configuration or a JWKS.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// An algorithm name that is not one Sandgate verifies (`none` included).
    #[error("unsupported algorithm `{0}`")]
    Algorithm(String),
    /// A JWK without `alg` whose type implies none.
    #[error("JWK {0:?} has no `alg` and none can be implied from its type")]
    NoAlgorithm(Option<String>),
    /// A JWK the JWT library cannot use.
    #[error("invalid JWK")]
    Jwk(#[source] jsonwebtoken::errors::Error),
    /// A key file that cannot be read.
    #[error("cannot read `{}`", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    /// A key file that is not the JSON it should be.
    #[error("`{}` is not a {}", .0.display(), .1)]
    NotJson(PathBuf, &'static str, #[source] serde_json::Error),
    /// A PEM file that is not a public key of its algorithm.
    #[error("`{}` is not a {:?} public key", .0.display(), .1)]
    NotAKey(PathBuf, Algorithm, #[source] jsonwebtoken::errors::Error),
    /// A PEM key without an `algorithm`.
    #[error("PEM key `{}` needs an `algorithm`", .0.display())]
    PemNeedsAlgorithm(PathBuf),
    /// An HMAC algorithm given a PEM file.
    #[error("an HMAC algorithm takes a `secret`, not a PEM key")]
    HmacNeedsSecret,
    /// A secret without an HMAC algorithm.
    #[error("a `secret` needs `algorithm` HS256, HS384 or HS512")]
    SecretNeedsHmac,
    /// A key entry with no source.
    #[error("a key needs one of `pem_file`, `jwk_file`, `jwks_file` or `secret`")]
    NoSource,
    /// A JWKS with keys, none of them usable for signatures.
    #[error("the JWKS has no usable signing key")]
    NoUsableKey,
    /// A JWK whose `alg`, `use` or `key_ops` say it is not for verifying signatures.
    #[error("JWK {0:?} is not for verifying signatures (its `alg`, `use` or `key_ops` say otherwise)")]
    NotForSignatures(Option<String>),
    /// A symmetric (`oct`) key from a JWKS endpoint: anyone who can read it could sign tokens.
    #[error("JWK {0:?} is a shared secret (`oct`); secrets are never taken from a JWKS endpoint")]
    RemoteSecret(Option<String>),
    /// An HMAC secret shorter than its algorithm's hash.
    #[error("an {0:?} secret needs at least {1} bytes, this one has {2}")]
    WeakSecret(Algorithm, usize, usize),
    /// A key of one issuer.
    #[error("issuer `{0}`")]
    Issuer(String, #[source] Box<KeyError>),
}

/// Parse an algorithm name; `none` and unknown names are errors.
pub fn parse_algorithm(name: &str) -> Result<Algorithm, KeyError> {
    Algorithm::from_str(name).map_err(|_| KeyError::Algorithm(name.to_owned()))
}

/// One verification key.
pub struct Key {
    /// The `kid` tokens name it by.
    pub kid: Option<String>,
    /// The one algorithm it verifies.
    pub algorithm: Algorithm,
    pub(crate) decoding: DecodingKey,
    /// Whether it came from the issuer's JWKS endpoint (replaced on refresh) or configuration.
    pub from_jwks_url: bool,
}

impl Key {
    /// A key from a JWK; its algorithm is the JWK's `alg`, else `fallback`, else the one its
    /// type implies (EC P-256 → ES256, P-384 → ES384, Ed25519 → EdDSA, RSA → RS256).
    ///
    /// Refused: a JWK declared for anything but signature verification (`use: enc`, `key_ops`
    /// without `verify`, an encryption `alg`), a shared secret from a JWKS endpoint, and an
    /// HMAC secret shorter than its hash.
    pub fn from_jwk(jwk: &Jwk, fallback: Option<Algorithm>, from_jwks_url: bool) -> Result<Key, KeyError> {
        let kid = || jwk.common.key_id.clone();
        let for_encryption = matches!(jwk.common.public_key_use, Some(jsonwebtoken::jwk::PublicKeyUse::Encryption))
            || jwk
                .common
                .key_operations
                .as_ref()
                .is_some_and(|ops| !ops.contains(&jsonwebtoken::jwk::KeyOperations::Verify));
        let declared = match jwk.common.key_algorithm {
            Some(alg) => Some(Algorithm::from_str(&alg.to_string()).map_err(|_| KeyError::NotForSignatures(kid()))?),
            None => None,
        };
        if for_encryption {
            return Err(KeyError::NotForSignatures(kid()));
        }
        if let AlgorithmParameters::OctetKey(secret) = &jwk.algorithm {
            if from_jwks_url {
                return Err(KeyError::RemoteSecret(kid()));
            }
            let algorithm = declared.or(fallback).ok_or_else(|| KeyError::NoAlgorithm(kid()))?;
            let bytes = base64::Engine::decode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                secret.value.trim_end_matches('='),
            )
            .map_err(|_| KeyError::NotForSignatures(kid()))?;
            check_secret(algorithm, bytes.len())?;
        }
        let implied = match &jwk.algorithm {
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => Some(Algorithm::ES256),
                EllipticCurve::P384 => Some(Algorithm::ES384),
                _ => None,
            },
            AlgorithmParameters::OctetKeyPair(_) => Some(Algorithm::EdDSA),
            AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
            _ => None,
        };
        let Some(algorithm) = declared.or(fallback).or(implied) else {
            return Err(KeyError::NoAlgorithm(jwk.common.key_id.clone()));
        };
        let decoding = DecodingKey::from_jwk(jwk).map_err(KeyError::Jwk)?;
        Ok(Key { kid: jwk.common.key_id.clone(), algorithm, decoding, from_jwks_url })
    }

    /// Keys from a static configuration entry.
    pub fn from_source(source: &KeySource) -> Result<Vec<Key>, KeyError> {
        let algorithm = source.algorithm.as_deref().map(parse_algorithm).transpose()?;
        let read = |p: &Path| std::fs::read(p).map_err(|e| KeyError::Read(p.to_owned(), e));
        let static_key = |decoding: DecodingKey, algorithm: Algorithm| Key {
            kid: source.kid.clone(),
            algorithm,
            decoding,
            from_jwks_url: false,
        };
        if let Some(path) = &source.pem_file {
            let Some(algorithm) = algorithm else { return Err(KeyError::PemNeedsAlgorithm(path.clone())) };
            let pem = read(path)?;
            use jsonwebtoken::AlgorithmFamily as F;
            let decoding = match algorithm.family() {
                F::Rsa => DecodingKey::from_rsa_pem(&pem),
                F::Ec => DecodingKey::from_ec_pem(&pem),
                F::Ed => DecodingKey::from_ed_pem(&pem),
                F::Hmac => return Err(KeyError::HmacNeedsSecret),
            }
            .map_err(|e| KeyError::NotAKey(path.clone(), algorithm, e))?;
            return Ok(vec![static_key(decoding, algorithm)]);
        }
        if let Some(secret) = &source.secret {
            let Some(algorithm) = algorithm.filter(|a| a.family() == jsonwebtoken::AlgorithmFamily::Hmac) else {
                return Err(KeyError::SecretNeedsHmac);
            };
            check_secret(algorithm, secret.len())?;
            return Ok(vec![static_key(DecodingKey::from_secret(secret.as_bytes()), algorithm)]);
        }
        if let Some(path) = &source.jwk_file {
            let jwk: Jwk =
                serde_json::from_slice(&read(path)?).map_err(|e| KeyError::NotJson(path.clone(), "JWK", e))?;
            let mut key = Key::from_jwk(&jwk, algorithm, false)?;
            key.kid = key.kid.or_else(|| source.kid.clone());
            return Ok(vec![key]);
        }
        if let Some(path) = &source.jwks_file {
            let set: JwkSet =
                serde_json::from_slice(&read(path)?).map_err(|e| KeyError::NotJson(path.clone(), "JWKS", e))?;
            return keys_from_jwks(&set, false);
        }
        Err(KeyError::NoSource)
    }
}

/// An HMAC secret must be at least as long as its hash (RFC 7518 §3.2): 32, 48 or 64 bytes.
fn check_secret(algorithm: Algorithm, len: usize) -> Result<(), KeyError> {
    let min = match algorithm {
        Algorithm::HS256 => 32,
        Algorithm::HS384 => 48,
        Algorithm::HS512 => 64,
        _ => return Err(KeyError::SecretNeedsHmac),
    };
    if len < min { Err(KeyError::WeakSecret(algorithm, min, len)) } else { Ok(()) }
}

/// The usable keys of a JWKS. Keys not for signatures, shared secrets from an endpoint, and
/// keys of unsupported types are skipped (and logged); a set with no usable key is an error.
pub fn keys_from_jwks(set: &JwkSet, from_jwks_url: bool) -> Result<Vec<Key>, KeyError> {
    let keys: Vec<Key> = set
        .keys
        .iter()
        .filter_map(|jwk| match Key::from_jwk(jwk, None, from_jwks_url) {
            Ok(key) => Some(key),
            Err(e) => {
                tracing::warn!(kid = ?jwk.common.key_id, error = %crate::error_chain(&e), "JWK skipped");
                None
            }
        })
        .collect();
    if keys.is_empty() && !set.keys.is_empty() {
        return Err(KeyError::NoUsableKey);
    }
    Ok(keys)
}

/// One issuer: its rules and current keys.
pub struct Issuer {
    /// `iss`.
    pub issuer: String,
    pub(crate) audiences: Vec<String>,
    pub(crate) algorithms: Vec<Algorithm>,
    pub(crate) leeway: u64,
    /// Current keys.
    pub keys: Vec<Arc<Key>>,
    /// Whether an unknown `kid` may be looked up at a JWKS endpoint.
    pub has_jwks_endpoint: bool,
    /// Key ids an operator blocked: tokens naming them are refused, whatever the key sets hold.
    pub blocked_kids: std::collections::BTreeSet<String>,
    /// When keys were last fetched from the JWKS endpoint (Unix seconds).
    pub fetched_at: Option<u64>,
    /// How long fetched keys are trusted after the last successful fetch; `None`: until
    /// replaced.
    pub(crate) max_stale: Option<u64>,
}

impl Issuer {
    /// An issuer with its static keys.
    pub fn from_config(config: &IssuerConfig) -> Result<Issuer, KeyError> {
        let in_issuer = |e| KeyError::Issuer(config.issuer.clone(), Box::new(e));
        let mut keys = Vec::new();
        for source in &config.keys {
            keys.extend(Key::from_source(source).map_err(in_issuer)?.into_iter().map(Arc::new));
        }
        Ok(Issuer {
            issuer: config.issuer.clone(),
            audiences: config.audiences.clone(),
            algorithms: config
                .algorithms
                .iter()
                .map(|a| parse_algorithm(a))
                .collect::<Result<_, _>>()
                .map_err(in_issuer)?,
            leeway: config.leeway_secs,
            keys,
            has_jwks_endpoint: config.jwks_url.is_some() || config.discovery_url.is_some(),
            blocked_kids: Default::default(),
            fetched_at: None,
            max_stale: config.jwks_max_stale_secs,
        })
    }

    /// The same issuer with its static keys replaced by `keys` (JWKS-endpoint keys stay).
    pub fn with_static_keys(&self, keys: Vec<Key>) -> Issuer {
        self.with_shared_static_keys(keys.into_iter().map(Arc::new).collect())
    }

    /// [`Issuer::with_static_keys`] for keys already shared with another key set.
    pub fn with_shared_static_keys(&self, keys: Vec<Arc<Key>>) -> Issuer {
        let mut all: Vec<Arc<Key>> = self.keys.iter().filter(|k| k.from_jwks_url).cloned().collect();
        all.extend(keys);
        Issuer { keys: all, ..self.clone_rules() }
    }

    /// Its static keys (those not from the JWKS endpoint).
    pub fn static_keys(&self) -> Vec<Arc<Key>> {
        self.keys.iter().filter(|k| !k.from_jwks_url).cloned().collect()
    }

    fn clone_rules(&self) -> Issuer {
        Issuer {
            issuer: self.issuer.clone(),
            audiences: self.audiences.clone(),
            algorithms: self.algorithms.clone(),
            leeway: self.leeway,
            keys: Vec::new(),
            has_jwks_endpoint: self.has_jwks_endpoint,
            blocked_kids: self.blocked_kids.clone(),
            fetched_at: self.fetched_at,
            max_stale: self.max_stale,
        }
    }

    /// The same issuer with `kid` blocked (`true`) or unblocked.
    pub fn with_blocked_kid(&self, kid: &str, blocked: bool) -> Issuer {
        let mut issuer = Issuer { keys: self.keys.clone(), ..self.clone_rules() };
        if blocked {
            issuer.blocked_kids.insert(kid.to_owned());
        } else {
            issuer.blocked_kids.remove(kid);
        }
        issuer
    }

    /// The same issuer with its JWKS-endpoint keys replaced by `fetched`, fetched now.
    pub fn with_fetched_keys(&self, fetched: Vec<Key>) -> Issuer {
        let mut keys: Vec<Arc<Key>> = self.keys.iter().filter(|k| !k.from_jwks_url).cloned().collect();
        keys.extend(fetched.into_iter().map(Arc::new));
        Issuer { keys, fetched_at: Some(crate::unix_now()), ..self.clone_rules() }
    }

    /// Whether keys fetched from the JWKS endpoint may still be used at `now`: not when the last
    /// successful fetch is older than `jwks_max_stale_secs`.
    pub(crate) fn fetched_keys_fresh(&self, now: u64) -> bool {
        match (self.max_stale, self.fetched_at) {
            (Some(max), Some(at)) => now.saturating_sub(at) <= max,
            _ => true,
        }
    }
}

/// All issuers and their keys: immutable, versioned, part of a snapshot.
#[derive(Default)]
pub struct KeySets {
    /// Bumped on every change (a JWKS refresh, a rotation).
    pub version: u64,
    /// By `iss`.
    pub issuers: HashMap<String, Arc<Issuer>>,
}

impl KeySets {
    /// Whether `issuer` has a key `kid`.
    pub fn has_kid(&self, issuer: &str, kid: &str) -> bool {
        self.issuers.get(issuer).is_some_and(|i| i.keys.iter().any(|k| k.kid.as_deref() == Some(kid)))
    }

    /// The next version of these key sets, with `issuer` changed by `change` (unchanged when
    /// there is no such issuer).
    pub fn with_issuer(&self, issuer: &str, change: impl FnOnce(&Issuer) -> Issuer) -> KeySets {
        let mut issuers = self.issuers.clone();
        if let Some(current) = issuers.get(issuer) {
            let updated = Arc::new(change(current));
            issuers.insert(issuer.to_owned(), updated);
        }
        KeySets { version: self.version + 1, issuers }
    }
}

/// Revoked token ids and subjects: immutable, versioned, part of a snapshot.
#[derive(Debug, Default, Clone)]
pub struct Revocations {
    /// Bumped on every change.
    pub version: u64,
    /// Revoked `jti`s.
    pub jtis: HashSet<String>,
    /// Subjects whose every token is revoked.
    pub subjects: HashSet<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn set(keys: serde_json::Value) -> JwkSet {
        serde_json::from_value(json!({ "keys": keys })).unwrap()
    }

    fn b64(bytes: &[u8]) -> String {
        base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, bytes)
    }

    #[test]
    fn a_shared_secret_is_never_taken_from_a_jwks_endpoint() {
        let oct = set(json!([{ "kty": "oct", "kid": "s", "alg": "HS256", "k": b64(&[7; 32]) }]));
        assert!(matches!(keys_from_jwks(&oct, true), Err(KeyError::NoUsableKey)));
        // From the operator (admin API, a file) it is a key like any other.
        assert_eq!(keys_from_jwks(&oct, false).unwrap().len(), 1);
    }

    #[test]
    fn hmac_secrets_are_at_least_as_long_as_their_hash() {
        let short = set(json!([{ "kty": "oct", "kid": "s", "alg": "HS256", "k": b64(&[7; 31]) }]));
        assert!(keys_from_jwks(&short, false).is_err());
        let hs512 = set(json!([{ "kty": "oct", "kid": "s", "alg": "HS512", "k": b64(&[7; 48]) }]));
        assert!(keys_from_jwks(&hs512, false).is_err());
        let source = |secret: &str, algorithm: &str| KeySource {
            kid: None,
            algorithm: Some(algorithm.into()),
            pem_file: None,
            jwk_file: None,
            jwks_file: None,
            secret: Some(secret.into()),
        };
        assert!(matches!(
            Key::from_source(&source("short", "HS256")),
            Err(KeyError::WeakSecret(Algorithm::HS256, 32, 5))
        ));
        assert!(Key::from_source(&source(&"x".repeat(32), "HS256")).is_ok());
        assert!(Key::from_source(&source(&"x".repeat(32), "HS384")).is_err());
    }

    #[test]
    fn keys_not_for_signatures_are_skipped() {
        let secret = b64(&[7; 32]);
        let not_for_signing = set(json!([
            { "kty": "oct", "kid": "enc", "use": "enc", "alg": "HS256", "k": secret },
            { "kty": "oct", "kid": "ops", "key_ops": ["encrypt"], "alg": "HS256", "k": secret },
            { "kty": "oct", "kid": "oaep", "alg": "RSA-OAEP", "k": secret },
        ]));
        assert!(matches!(keys_from_jwks(&not_for_signing, false), Err(KeyError::NoUsableKey)));
        let verify = set(json!([{ "kty": "oct", "kid": "ok", "key_ops": ["verify"], "alg": "HS256", "k": secret }]));
        assert_eq!(keys_from_jwks(&verify, false).unwrap().len(), 1);
    }
}
