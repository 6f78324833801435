//! Token verification on the host: issuers, their keys by `kid`, revocations.
//!
//! Every key has exactly one algorithm. A token is accepted only when its header's `alg` is
//! both the key's algorithm and one its issuer allows, so `alg: none` (not an algorithm at
//! all here) and algorithm confusion (an HS256 token "signed" with an RSA public key) fail
//! before any signature check.

use crate::bindings::sandgate::policy::types::{CredentialError, VerifiedCredential};
use crate::config::{IssuerConfig, KeySource};
use anyhow::{Context, bail};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;

/// Parse an algorithm name; `none` and unknown names are errors.
pub fn parse_algorithm(name: &str) -> anyhow::Result<Algorithm> {
    Algorithm::from_str(name).map_err(|_| anyhow::anyhow!("unsupported algorithm `{name}`"))
}

/// One verification key.
pub struct Key {
    /// The `kid` tokens name it by.
    pub kid: Option<String>,
    /// The one algorithm it verifies.
    pub algorithm: Algorithm,
    decoding: DecodingKey,
    /// Whether it came from the issuer's JWKS endpoint (replaced on refresh) or configuration.
    pub from_jwks_url: bool,
}

impl Key {
    /// A key from a JWK; its algorithm is the JWK's `alg`, else `fallback`, else the one its
    /// type implies (EC P-256 → ES256, P-384 → ES384, Ed25519 → EdDSA, RSA → RS256).
    pub fn from_jwk(jwk: &Jwk, fallback: Option<Algorithm>, from_jwks_url: bool) -> anyhow::Result<Key> {
        let declared = jwk.common.key_algorithm.and_then(|a| Algorithm::from_str(&a.to_string()).ok());
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
            bail!("JWK {:?} has no `alg` and none can be implied from its type", jwk.common.key_id);
        };
        let decoding = DecodingKey::from_jwk(jwk).context("invalid JWK")?;
        Ok(Key { kid: jwk.common.key_id.clone(), algorithm, decoding, from_jwks_url })
    }

    /// Keys from a static configuration entry.
    pub fn from_source(source: &KeySource) -> anyhow::Result<Vec<Key>> {
        let algorithm = source.algorithm.as_deref().map(parse_algorithm).transpose()?;
        let read = |p: &std::path::Path| std::fs::read(p).with_context(|| format!("cannot read `{}`", p.display()));
        let static_key = |decoding: DecodingKey, algorithm: Algorithm| Key {
            kid: source.kid.clone(),
            algorithm,
            decoding,
            from_jwks_url: false,
        };
        if let Some(path) = &source.pem_file {
            let Some(algorithm) = algorithm else { bail!("PEM key `{}` needs an `algorithm`", path.display()) };
            let pem = read(path)?;
            use jsonwebtoken::AlgorithmFamily as F;
            let decoding = match algorithm.family() {
                F::Rsa => DecodingKey::from_rsa_pem(&pem),
                F::Ec => DecodingKey::from_ec_pem(&pem),
                F::Ed => DecodingKey::from_ed_pem(&pem),
                F::Hmac => bail!("an HMAC algorithm takes a `secret`, not a PEM key"),
            }
            .with_context(|| format!("`{}` is not a {algorithm:?} public key", path.display()))?;
            return Ok(vec![static_key(decoding, algorithm)]);
        }
        if let Some(secret) = &source.secret {
            let Some(algorithm) = algorithm.filter(|a| a.family() == jsonwebtoken::AlgorithmFamily::Hmac) else {
                bail!("a `secret` needs `algorithm` HS256, HS384 or HS512");
            };
            return Ok(vec![static_key(DecodingKey::from_secret(secret.as_bytes()), algorithm)]);
        }
        if let Some(path) = &source.jwk_file {
            let jwk: Jwk = serde_json::from_slice(&read(path)?).with_context(|| format!("`{}` is not a JWK", path.display()))?;
            let mut key = Key::from_jwk(&jwk, algorithm, false)?;
            key.kid = key.kid.or_else(|| source.kid.clone());
            return Ok(vec![key]);
        }
        if let Some(path) = &source.jwks_file {
            let set: JwkSet = serde_json::from_slice(&read(path)?).with_context(|| format!("`{}` is not a JWKS", path.display()))?;
            return keys_from_jwks(&set, false);
        }
        bail!("a key needs one of `pem_file`, `jwk_file`, `jwks_file` or `secret`")
    }
}

/// The usable keys of a JWKS. Keys meant only for encryption, or of unsupported types, are
/// skipped; a set with no usable key is an error.
pub fn keys_from_jwks(set: &JwkSet, from_jwks_url: bool) -> anyhow::Result<Vec<Key>> {
    let keys: Vec<Key> = set
        .keys
        .iter()
        .filter(|jwk| !matches!(jwk.common.public_key_use, Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)))
        .filter_map(|jwk| Key::from_jwk(jwk, None, from_jwks_url).ok())
        .collect();
    if keys.is_empty() && !set.keys.is_empty() {
        bail!("the JWKS has no usable signing key");
    }
    Ok(keys)
}

/// One issuer: its rules and current keys.
pub struct Issuer {
    /// `iss`.
    pub issuer: String,
    audiences: Vec<String>,
    algorithms: Vec<Algorithm>,
    leeway: u64,
    /// Current keys.
    pub keys: Vec<Arc<Key>>,
    /// Whether an unknown `kid` may be looked up at a JWKS endpoint.
    pub has_jwks_endpoint: bool,
}

impl Issuer {
    /// An issuer with its static keys.
    pub fn from_config(config: &IssuerConfig) -> anyhow::Result<Issuer> {
        let mut keys = Vec::new();
        for source in &config.keys {
            keys.extend(Key::from_source(source).with_context(|| format!("issuer `{}`", config.issuer))?.into_iter().map(Arc::new));
        }
        Ok(Issuer {
            issuer: config.issuer.clone(),
            audiences: config.audiences.clone(),
            algorithms: config.algorithms.iter().map(|a| parse_algorithm(a)).collect::<anyhow::Result<_>>()?,
            leeway: config.leeway_secs,
            keys,
            has_jwks_endpoint: config.jwks_url.is_some() || config.discovery_url.is_some(),
        })
    }

    /// The same issuer with its static keys replaced by `keys` (JWKS-endpoint keys stay).
    pub fn with_static_keys(&self, keys: Vec<Key>) -> Issuer {
        let mut all: Vec<Arc<Key>> = self.keys.iter().filter(|k| k.from_jwks_url).cloned().collect();
        all.extend(keys.into_iter().map(Arc::new));
        Issuer { keys: all, ..self.clone_rules() }
    }

    fn clone_rules(&self) -> Issuer {
        Issuer {
            issuer: self.issuer.clone(),
            audiences: self.audiences.clone(),
            algorithms: self.algorithms.clone(),
            leeway: self.leeway,
            keys: Vec::new(),
            has_jwks_endpoint: self.has_jwks_endpoint,
        }
    }

    /// The same issuer with its JWKS-endpoint keys replaced by `fetched`.
    pub fn with_fetched_keys(&self, fetched: Vec<Key>) -> Issuer {
        let mut keys: Vec<Arc<Key>> = self.keys.iter().filter(|k| !k.from_jwks_url).cloned().collect();
        keys.extend(fetched.into_iter().map(Arc::new));
        Issuer { keys, ..self.clone_rules() }
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

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The issuer is known and has a JWKS endpoint, but not this key: fetching may help.
    UnknownKid {
        /// The token's issuer.
        issuer: String,
        /// The `kid` (empty when the token named none).
        kid: String,
    },
    /// Final: the reason code and a message.
    Invalid(&'static str, String),
}

impl Rejection {
    fn invalid(reason: &'static str, message: impl Into<String>) -> Self {
        Rejection::Invalid(reason, message.into())
    }

    /// As the WIT `credential-error`.
    pub fn to_credential_error(&self) -> CredentialError {
        match self {
            Rejection::UnknownKid { kid, .. } => CredentialError {
                reason: "unknown_kid".into(),
                message: format!("no key with kid `{kid}` for this issuer"),
            },
            Rejection::Invalid(reason, message) => CredentialError { reason: (*reason).into(), message: message.clone() },
        }
    }
}

#[derive(serde::Deserialize)]
struct IssuerOnly {
    iss: Option<String>,
}

impl KeySets {
    /// Whether `issuer` has a key `kid`.
    pub fn has_kid(&self, issuer: &str, kid: &str) -> bool {
        self.issuers.get(issuer).is_some_and(|i| i.keys.iter().any(|k| k.kid.as_deref() == Some(kid)))
    }

    /// Verify `token`: shape, issuer, algorithm, key, signature, `exp`/`nbf`, audience, then
    /// revocation. Never panics on any input.
    pub fn verify(&self, token: &str, revocations: &Revocations) -> Result<VerifiedCredential, Rejection> {
        let credential = self.verify_signature(token)?;
        check_revocation(&credential, revocations)?;
        Ok(credential)
    }

    /// Everything [`KeySets::verify`] checks except revocation: what a verified-token cache
    /// may remember (revocation must be checked on every request).
    pub fn verify_signature(&self, token: &str) -> Result<VerifiedCredential, Rejection> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| Rejection::invalid("malformed_token", format!("cannot read the token header: {e}")))?;
        // The issuer decides which keys and rules apply; it is read before the signature is
        // checked, and checked again by the validation below.
        let iss = jsonwebtoken::dangerous::insecure_decode_claims::<IssuerOnly>(token)
            .map_err(|e| Rejection::invalid("malformed_token", format!("cannot read the token claims: {e}")))?
            .iss
            .ok_or_else(|| Rejection::invalid("missing_issuer", "the token has no `iss`"))?;
        let issuer = self.issuers.get(&iss).ok_or_else(|| Rejection::invalid("unknown_issuer", "the token's issuer is not trusted"))?;
        if !issuer.algorithms.contains(&header.alg) {
            return Err(Rejection::invalid("algorithm_not_allowed", format!("{:?} is not allowed for this issuer", header.alg)));
        }
        let candidates: Vec<&Arc<Key>> = match &header.kid {
            Some(kid) => issuer.keys.iter().filter(|k| k.kid.as_deref() == Some(kid.as_str())).collect(),
            None => issuer.keys.iter().filter(|k| k.algorithm == header.alg).collect(),
        };
        if candidates.is_empty() {
            let kid = header.kid.clone().unwrap_or_default();
            return Err(if issuer.has_jwks_endpoint {
                Rejection::UnknownKid { issuer: iss, kid }
            } else {
                Rejection::invalid("unknown_kid", format!("no key with kid `{kid}` for this issuer"))
            });
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&issuer.issuer]);
        validation.leeway = issuer.leeway;
        validation.validate_nbf = true;
        if issuer.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&issuer.audiences);
        }
        let mut last = Rejection::invalid("algorithm_mismatch", format!("no key for {:?}", header.alg));
        for key in candidates {
            if key.algorithm != header.alg {
                last = Rejection::invalid("algorithm_mismatch", format!("the key is for {:?}, the token says {:?}", key.algorithm, header.alg));
                continue;
            }
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, &validation) {
                Ok(data) => return Ok(crate::request::verified_credential(data.claims, header.kid, &format!("{:?}", header.alg))),
                Err(e) => last = rejection(e.kind()),
            }
        }
        Err(last)
    }
}

/// `Err(token_revoked)` if the credential's `jti` or subject is revoked.
pub fn check_revocation(credential: &VerifiedCredential, revocations: &Revocations) -> Result<(), Rejection> {
    let c = &credential.claims;
    if c.token_id.as_ref().is_some_and(|j| revocations.jtis.contains(j)) || revocations.subjects.contains(&c.subject) {
        return Err(Rejection::invalid("token_revoked", "the token has been revoked"));
    }
    Ok(())
}

fn rejection(kind: &ErrorKind) -> Rejection {
    let (reason, message) = match kind {
        ErrorKind::ExpiredSignature => ("token_expired", "the token has expired".to_string()),
        ErrorKind::ImmatureSignature => ("token_not_yet_valid", "the token is not valid yet".into()),
        ErrorKind::InvalidAudience => ("wrong_audience", "the token is not for this audience".into()),
        ErrorKind::InvalidIssuer => ("wrong_issuer", "the token's issuer does not match".into()),
        ErrorKind::InvalidSignature => ("bad_signature", "the signature does not verify".into()),
        ErrorKind::InvalidAlgorithm => ("algorithm_mismatch", "the algorithm does not match the key".into()),
        ErrorKind::MissingRequiredClaim(c) => ("missing_claim", format!("the token has no `{c}`")),
        ErrorKind::InvalidClaimFormat(c) => ("malformed_token", format!("claim `{c}` has the wrong type")),
        other => ("malformed_token", format!("{other:?}")),
    };
    Rejection::Invalid(reason, message)
}
