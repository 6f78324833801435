//! Between the auth crate's verified tokens and the WIT types a policy sees.

use sandgate_auth::{Rejection, VerifiedToken};
use sandgate_runtime::bindings::sandgate::policy::types::{CredentialError, VerifiedCredential};

/// A verified token as the WIT `verified-credential`.
pub fn verified(token: VerifiedToken) -> VerifiedCredential {
    VerifiedCredential {
        key_id: token.key_id,
        algorithm: token.algorithm,
        claims: sandgate_runtime::spec::wit_claims(token.claims),
        claims_json: token.claims_json,
    }
}

/// A rejection as the WIT `credential-error`: its reason code and message.
pub fn rejected(rejection: &Rejection) -> CredentialError {
    CredentialError { reason: rejection.reason().into(), message: rejection.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Map, Value, json};

    /// Claims of every shape the standard claims are read from, and shapes they are not.
    fn claims() -> impl Strategy<Value = Map<String, Value>> {
        let value = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<u64>().prop_map(|n| json!(n)),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|f| json!(f)),
            ".{0,8}".prop_map(Value::String),
            "[a-z]{1,4}( [a-z]{1,4}){0,3}".prop_map(Value::String),
            proptest::collection::vec(
                prop_oneof![".{0,6}".prop_map(Value::String), any::<u64>().prop_map(|n| json!(n))],
                0..3
            )
            .prop_map(Value::Array),
        ];
        let name = prop_oneof![
            Just("iss"),
            Just("sub"),
            Just("aud"),
            Just("exp"),
            Just("iat"),
            Just("jti"),
            Just("scope"),
            Just("scp"),
            Just("roles"),
            Just("tenant")
        ];
        proptest::collection::btree_map(name.prop_map(str::to_owned), value, 0..10)
            .prop_map(|claims| claims.into_iter().collect())
    }

    proptest! {
        /// A record (format 2) leaves a credential's standard claims out, to be read back from
        /// its `claims_json`: what a policy received must be exactly what that gives.
        #[test]
        fn the_standard_claims_a_policy_receives_are_those_its_claims_json_gives(claims in claims()) {
            let credential = verified(VerifiedToken::new(claims, Some("k".into()), "ES256"));
            let from_text = sandgate_records::format::standard_claims(&credential.claims_json);
            prop_assert_eq!(from_text, Ok(credential.claims));
        }
    }
}
