//! Between the auth crate's verified tokens and the WIT types a policy sees.

use sandgate_auth::{Rejection, VerifiedToken};
use sandgate_runtime::bindings::sandgate::policy::types::{CredentialError, StandardClaims, VerifiedCredential};

/// A verified token as the WIT `verified-credential`.
pub fn verified(token: VerifiedToken) -> VerifiedCredential {
    let c = token.claims;
    VerifiedCredential {
        key_id: token.key_id,
        algorithm: token.algorithm,
        claims: StandardClaims {
            issuer: c.issuer,
            subject: c.subject,
            audiences: c.audiences,
            expires_at: c.expires_at,
            issued_at: c.issued_at,
            token_id: c.token_id,
            scopes: c.scopes,
            roles: c.roles,
        },
        claims_json: token.claims_json,
    }
}

/// A rejection as the WIT `credential-error`: its reason code and message.
pub fn rejected(rejection: &Rejection) -> CredentialError {
    CredentialError { reason: rejection.reason().into(), message: rejection.to_string() }
}
