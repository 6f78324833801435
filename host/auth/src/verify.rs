//! Verifying a bearer token against the pinned key sets: shape, issuer, algorithm, key,
//! signature, `exp`/`nbf`, audience, then revocation. Never panics on any input.

use crate::credential::VerifiedToken;
use crate::keys::{Key, KeySets, Revocations};
use jsonwebtoken::Validation;
use jsonwebtoken::errors::ErrorKind;
use serde_json::{Map, Value};
use std::sync::Arc;

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The issuer is known and has a JWKS endpoint, but not this key: fetching may help.
    #[error("no key with kid `{kid}` for this issuer")]
    UnknownKid {
        /// The token's issuer.
        issuer: String,
        /// The `kid` (empty when the token named none).
        kid: String,
    },
    /// Final: the reason code and a message.
    #[error("{1}")]
    Invalid(&'static str, String),
}

impl Rejection {
    fn invalid(reason: &'static str, message: impl Into<String>) -> Self {
        Rejection::Invalid(reason, message.into())
    }

    /// The reason code the deny and the decision log carry.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::UnknownKid { .. } => "unknown_kid",
            Rejection::Invalid(reason, _) => reason,
        }
    }
}

#[derive(serde::Deserialize)]
struct IssuerOnly {
    iss: Option<String>,
}

impl KeySets {
    /// Verify `token`: shape, issuer, algorithm, key, signature, `exp`/`nbf`, audience, then
    /// revocation. Never panics on any input.
    pub fn verify(&self, token: &str, revocations: &Revocations) -> Result<VerifiedToken, Rejection> {
        let credential = self.verify_signature(token)?;
        check_revocation(&credential, revocations)?;
        Ok(credential)
    }

    /// Everything [`KeySets::verify`] checks except revocation: what a verified-token cache
    /// may remember (revocation must be checked on every request).
    pub fn verify_signature(&self, token: &str) -> Result<VerifiedToken, Rejection> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| Rejection::invalid("malformed_token", format!("cannot read the token header: {e}")))?;
        // The issuer decides which keys and rules apply; it is read before the signature is
        // checked, and checked again by the validation below.
        let iss = jsonwebtoken::dangerous::insecure_decode_claims::<IssuerOnly>(token)
            .map_err(|e| Rejection::invalid("malformed_token", format!("cannot read the token claims: {e}")))?
            .iss
            .ok_or_else(|| Rejection::invalid("missing_issuer", "the token has no `iss`"))?;
        let issuer = self
            .issuers
            .get(&iss)
            .ok_or_else(|| Rejection::invalid("unknown_issuer", "the token's issuer is not trusted"))?;
        if !issuer.algorithms.contains(&header.alg) {
            return Err(Rejection::invalid(
                "algorithm_not_allowed",
                format!("{:?} is not allowed for this issuer", header.alg),
            ));
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
                last = Rejection::invalid(
                    "algorithm_mismatch",
                    format!("the key is for {:?}, the token says {:?}", key.algorithm, header.alg),
                );
                continue;
            }
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, &validation) {
                Ok(data) => return Ok(VerifiedToken::new(data.claims, header.kid, &format!("{:?}", header.alg))),
                Err(e) => last = rejection(e.kind()),
            }
        }
        Err(last)
    }
}

/// `Err(token_revoked)` if the credential's `jti` or subject is revoked.
pub fn check_revocation(credential: &VerifiedToken, revocations: &Revocations) -> Result<(), Rejection> {
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
