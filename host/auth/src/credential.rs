//! What a verified token tells the host: the key and algorithm it was verified with, its
//! standard claims typed, and every claim as JSON text. The server turns it into the WIT
//! `verified-credential` a policy sees.

use serde_json::{Map, Value};

/// A token whose signature, issuer, times and audience were verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// The `kid` of the key that verified it, when the token named one.
    pub key_id: Option<String>,
    /// The algorithm it was verified with, e.g. `ES256`.
    pub algorithm: String,
    /// The registered claims, typed.
    pub claims: sandgate_spec::StandardClaims,
    /// Every claim, as a JSON object.
    pub claims_json: String,
}

impl VerifiedToken {
    /// A verified token carrying `claims`, with the standard claims typed.
    pub fn new(claims: Map<String, Value>, key_id: Option<String>, algorithm: &str) -> Self {
        VerifiedToken {
            key_id,
            algorithm: algorithm.to_owned(),
            claims: sandgate_spec::StandardClaims::from_claims(&claims),
            claims_json: Value::Object(claims).to_string(),
        }
    }
}
