//! Verifying a bearer token against the pinned key sets: shape, issuer, algorithm, key,
//! signature, `exp`/`nbf`, audience, then revocation. Never panics on any input.
//!
//! (Over ~400 lines because of its tests: every attack it refuses is one, with the token that
//! carries it.)

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
    #[error("no key with kid `{}` for this issuer", shown(kid))]
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

impl KeySets {
    /// Verify `token`: shape, issuer, algorithm, key, signature, `exp`/`nbf`, audience, then
    /// revocation. Never panics on any input.
    pub fn verify(&self, token: &str, revocations: &Revocations) -> Result<VerifiedToken, Rejection> {
        let credential = self.verify_signature(token)?;
        check_revocation(&credential, revocations)?;
        Ok(credential)
    }

    /// Whether a token these key sets verified earlier (a verified-token cache's entry) may
    /// still be taken as verified: not once its issuer's fetched keys have gone stale
    /// (`jwks_max_stale_secs`) at `now`, which changes no key-set version. A token refused here is
    /// verified again, which refuses it (`jwks_stale`) if a fetched key verified it.
    pub fn still_valid(&self, verified: &VerifiedToken, now: u64) -> bool {
        self.issuers.get(&verified.claims.issuer).is_some_and(|issuer| issuer.fetched_keys_fresh(now))
    }

    /// Everything [`KeySets::verify`] checks except revocation: what a verified-token cache
    /// may remember (revocation must be checked on every request).
    pub fn verify_signature(&self, token: &str) -> Result<VerifiedToken, Rejection> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| Rejection::invalid("malformed_token", format!("cannot read the token header: {e}")))?;
        // The issuer decides which keys and rules apply; it is read (in the same pass that
        // refuses `crit` and repeated claims) before the signature is checked, and checked
        // again by the validation below.
        let iss = check_shape(token)?.ok_or_else(|| Rejection::invalid("missing_issuer", "the token has no `iss`"))?;
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
        if let Some(kid) = header.kid.as_deref().filter(|kid| issuer.blocked_kids.contains(*kid)) {
            return Err(Rejection::invalid("kid_blocked", format!("key `{}` is blocked by the operator", shown(kid))));
        }
        let fresh = issuer.fetched_keys_fresh(crate::unix_now());
        let candidates: Vec<&Arc<Key>> = match &header.kid {
            Some(kid) => issuer.keys.iter().filter(|k| k.kid.as_deref() == Some(kid.as_str())).collect(),
            None => issuer.keys.iter().filter(|k| k.algorithm == header.alg).collect(),
        };
        if !fresh && !candidates.is_empty() && candidates.iter().all(|k| k.from_jwks_url) {
            return Err(Rejection::invalid(
                "jwks_stale",
                "the issuer's keys could not be refreshed within jwks_max_stale_secs",
            ));
        }
        let candidates: Vec<&Arc<Key>> = candidates.into_iter().filter(|k| fresh || !k.from_jwks_url).collect();
        if candidates.is_empty() {
            let kid = header.kid.clone().unwrap_or_default();
            return Err(if issuer.has_jwks_endpoint {
                Rejection::UnknownKid { issuer: iss, kid }
            } else {
                Rejection::invalid("unknown_kid", format!("no key with kid `{}` for this issuer", shown(&kid)))
            });
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&issuer.issuer]);
        validation.leeway = issuer.leeway;
        validation.validate_nbf = true;
        // `aud` is checked below, stricter than the library does: it skips a missing or
        // mistyped `aud`.
        validation.validate_aud = false;
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
                Ok(data) => {
                    check_claims(&data.claims, &issuer.audiences)?;
                    return Ok(VerifiedToken::new(data.claims, header.kid, &format!("{:?}", header.alg)));
                }
                Err(e) => last = rejection(e.kind()),
            }
        }
        Err(last)
    }
}

/// A value from a token, safe to put in a message: at most 64 characters, anything but
/// printable ASCII escaped.
fn shown(value: &str) -> String {
    let mut out: String = value.chars().take(64).flat_map(char::escape_default).collect();
    if value.chars().count() > 64 {
        out.push('…');
    }
    out
}

/// What the JWT library does not check about a token's form: no `crit` header parameter (no
/// extension is supported, so a critical one must be refused, RFC 7515 §4.1.11), and no claim
/// named twice (parsers disagree on which one wins: a revoked `jti` followed by a fresh one).
/// Returns the unverified `iss`, read in the same pass.
fn check_shape(token: &str) -> Result<Option<String>, Rejection> {
    use base64::Engine;
    let mut parts = token.split('.');
    let (Some(header), Some(payload)) = (parts.next(), parts.next()) else {
        return Err(Rejection::invalid("malformed_token", "the token is not three base64url parts"));
    };
    let decode = |part: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|e| Rejection::invalid("malformed_token", format!("a token part is not base64url: {e}")))
    };
    let header: Map<String, Value> = serde_json::from_slice(&decode(header)?)
        .map_err(|e| Rejection::invalid("malformed_token", format!("the token header is not a JSON object: {e}")))?;
    if header.contains_key("crit") {
        return Err(Rejection::invalid(
            "unsupported_critical_header",
            "the token names critical header parameters (`crit`), and none is supported",
        ));
    }
    let claims: UniqueKeys = serde_json::from_slice(&decode(payload)?)
        .map_err(|e| Rejection::invalid("malformed_token", format!("cannot read the token claims: {e}")))?;
    match claims.duplicate {
        Some(name) => Err(Rejection::invalid("duplicate_claim", format!("the token names claim `{name}` twice"))),
        None => Ok(claims.iss),
    }
}

/// A JSON object's top level: the first key that appears twice, and `iss` (which must be a
/// string).
struct UniqueKeys {
    duplicate: Option<String>,
    iss: Option<String>,
}

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = UniqueKeys;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<UniqueKeys, A::Error> {
                let mut seen = std::collections::HashSet::new();
                let (mut duplicate, mut iss) = (None, None);
                while let Some(key) = map.next_key::<String>()? {
                    if key == "iss" {
                        iss = Some(map.next_value::<String>()?);
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                    if !seen.insert(key.clone()) && duplicate.is_none() {
                        duplicate = Some(key);
                    }
                }
                Ok(UniqueKeys { duplicate, iss })
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// Claims the policy and the revocation check rely on, held to their types: `aud` must name
/// one of the issuer's audiences (when it names any) as a string or an array of strings;
/// `sub` and `jti`, when present, must be strings.
fn check_claims(claims: &Map<String, Value>, audiences: &[String]) -> Result<(), Rejection> {
    for name in ["sub", "jti"] {
        if claims.get(name).is_some_and(|v| !v.is_string()) {
            return Err(Rejection::invalid("malformed_claim", format!("claim `{name}` is not a string")));
        }
    }
    if audiences.is_empty() {
        return Ok(());
    }
    let named: Vec<&str> = match claims.get("aud") {
        None => return Err(Rejection::invalid("missing_audience", "the token names no audience (`aud`)")),
        Some(Value::String(aud)) => vec![aud.as_str()],
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
            items.iter().filter_map(Value::as_str).collect()
        }
        Some(_) => {
            return Err(Rejection::invalid("malformed_audience", "`aud` is not a string or an array of strings"));
        }
    };
    if named.iter().any(|aud| audiences.iter().any(|a| a == aud)) {
        Ok(())
    } else {
        Err(Rejection::invalid("wrong_audience", "the token is not for this audience"))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{IssuerConfig, KeySource};
    use crate::keys::Issuer;
    use base64::Engine;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use serde_json::json;
    use std::collections::HashMap;

    const ISSUER: &str = "https://issuer.test";
    const SECRET: &str = "a-test-secret-that-is-at-least-32-bytes";

    fn key_sets(audiences: &[&str]) -> KeySets {
        let config = IssuerConfig {
            issuer: ISSUER.into(),
            audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
            algorithms: vec!["HS256".into()],
            leeway_secs: 0,
            keys: vec![KeySource {
                kid: Some("k".into()),
                algorithm: Some("HS256".into()),
                pem_file: None,
                jwk_file: None,
                jwks_file: None,
                secret: Some(SECRET.into()),
            }],
            jwks_url: None,
            discovery_url: None,
            jwks_refresh_secs: 300,
            jwks_min_refetch_ms: 10_000,
            jwks_max_stale_secs: None,
        };
        let issuer = Issuer::from_config(&config).unwrap();
        KeySets { version: 1, issuers: HashMap::from([(ISSUER.to_owned(), Arc::new(issuer))]) }
    }

    fn later() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600
    }

    fn token(claims: serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k".into());
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
    }

    /// A token signed over exactly these header and payload texts (duplicate keys and all).
    fn raw_token(header: &str, payload: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let message = format!("{}.{}", b64(header), b64(payload));
        let signature = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_secret(SECRET.as_bytes()),
            Algorithm::HS256,
        )
        .unwrap();
        format!("{message}.{signature}")
    }

    fn reason(keys: &KeySets, token: &str) -> &'static str {
        match keys.verify(token, &Revocations::default()) {
            Ok(_) => "accepted",
            Err(rejection) => rejection.reason(),
        }
    }

    #[test]
    fn an_issuer_with_audiences_requires_a_string_or_string_array_aud_naming_one() {
        let keys = key_sets(&["orders-api"]);
        let exp = later();
        assert_eq!(
            reason(&keys, &token(json!({ "iss": ISSUER, "sub": "a", "exp": exp, "aud": "orders-api" }))),
            "accepted"
        );
        let listed = json!({ "iss": ISSUER, "sub": "a", "exp": exp, "aud": ["other", "orders-api"] });
        assert_eq!(reason(&keys, &token(listed)), "accepted");
        // The attacks: no `aud` at all, and an `aud` that is not a string.
        assert_eq!(reason(&keys, &token(json!({ "iss": ISSUER, "sub": "a", "exp": exp }))), "missing_audience");
        assert_eq!(
            reason(&keys, &token(json!({ "iss": ISSUER, "sub": "a", "exp": exp, "aud": 12345 }))),
            "malformed_audience"
        );
        assert_eq!(
            reason(&keys, &token(json!({ "iss": ISSUER, "sub": "a", "exp": exp, "aud": [12345] }))),
            "malformed_audience"
        );
        assert_eq!(
            reason(&keys, &token(json!({ "iss": ISSUER, "sub": "a", "exp": exp, "aud": "other" }))),
            "wrong_audience"
        );
        // Without configured audiences `aud` is not checked.
        assert_eq!(reason(&key_sets(&[]), &token(json!({ "iss": ISSUER, "sub": "a", "exp": exp }))), "accepted");
    }

    #[test]
    fn duplicate_top_level_claims_are_rejected() {
        let keys = key_sets(&[]);
        let exp = later();
        let header = r#"{"alg":"HS256","typ":"JWT","kid":"k"}"#;
        let single = format!(r#"{{"iss":"{ISSUER}","sub":"a","exp":{exp},"jti":"fresh"}}"#);
        assert_eq!(reason(&keys, &raw_token(header, &single)), "accepted");
        // A revoked `jti` first, a fresh one second: a parser keeping the last would pass it.
        let twice = format!(r#"{{"iss":"{ISSUER}","sub":"a","exp":{exp},"jti":"revoked","jti":"fresh"}}"#);
        assert_eq!(reason(&keys, &raw_token(header, &twice)), "duplicate_claim");
    }

    #[test]
    fn unknown_critical_header_parameters_are_rejected() {
        let keys = key_sets(&[]);
        let payload = format!(r#"{{"iss":"{ISSUER}","sub":"a","exp":{}}}"#, later());
        let critical = r#"{"alg":"HS256","typ":"JWT","kid":"k","crit":["exp-policy"],"exp-policy":"x"}"#;
        assert_eq!(reason(&keys, &raw_token(critical, &payload)), "unsupported_critical_header");
    }

    #[test]
    fn non_string_jti_and_sub_are_rejected() {
        let keys = key_sets(&[]);
        let exp = later();
        assert_eq!(reason(&keys, &token(json!({ "iss": ISSUER, "sub": 7, "exp": exp }))), "malformed_claim");
        assert_eq!(
            reason(&keys, &token(json!({ "iss": ISSUER, "sub": "a", "jti": 7, "exp": exp }))),
            "malformed_claim"
        );
    }

    #[test]
    fn alg_none_and_algorithm_confusion_fail_before_any_signature_check() {
        let keys = key_sets(&[]);
        let payload = format!(r#"{{"iss":"{ISSUER}","sub":"a","exp":{}}}"#, later());
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let none = format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT","kid":"k"}"#), b64(&payload));
        assert_eq!(reason(&keys, &none), "malformed_token");
        // RS256 named in the header of a token "signed" with the issuer's HMAC secret.
        let confused = raw_token(r#"{"alg":"RS256","typ":"JWT","kid":"k"}"#, &payload);
        assert_eq!(reason(&keys, &confused), "algorithm_not_allowed");
        let mut both = key_sets(&[]);
        let issuer = both.issuers.get_mut(ISSUER).and_then(Arc::get_mut).unwrap();
        issuer.algorithms.push(Algorithm::RS256);
        assert_eq!(reason(&both, &confused), "algorithm_mismatch");
    }

    #[test]
    fn a_kid_is_never_reflected_raw() {
        let kid = format!("<script>{}\n", "x".repeat(100));
        let message = Rejection::UnknownKid { issuer: ISSUER.into(), kid }.to_string();
        assert!(!message.contains('\n') && message.len() < 120, "{message}");
        assert!(message.contains("<script>"), "printable ASCII is kept as is: {message}");
    }

    #[test]
    fn a_blocked_kid_is_refused_and_unblocked_accepted_again() {
        let mut keys = key_sets(&[]);
        let t = token(json!({ "iss": ISSUER, "sub": "a", "exp": later() }));
        let issuer = keys.issuers[ISSUER].with_blocked_kid("k", true);
        keys.issuers.insert(ISSUER.into(), Arc::new(issuer));
        assert_eq!(reason(&keys, &t), "kid_blocked");
        let issuer = keys.issuers[ISSUER].with_blocked_kid("k", false);
        keys.issuers.insert(ISSUER.into(), Arc::new(issuer));
        assert_eq!(reason(&keys, &t), "accepted");
    }

    #[test]
    fn fetched_keys_are_refused_once_older_than_jwks_max_stale_secs() {
        let mut keys = only_a_fetched_key();
        let t = token(json!({ "iss": ISSUER, "sub": "a", "exp": later() }));
        assert_eq!(reason(&keys, &t), "accepted");
        fetch_long_ago(&mut keys);
        assert_eq!(reason(&keys, &t), "jwks_stale");
    }

    /// Key sets whose issuer has only a key fetched from its JWKS endpoint, usable for 60 s
    /// after a successful fetch.
    fn only_a_fetched_key() -> KeySets {
        let mut keys = key_sets(&[]);
        let fetched = Key {
            kid: Some("k".into()),
            algorithm: Algorithm::HS256,
            decoding: jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()),
            from_jwks_url: true,
        };
        let mut issuer = keys.issuers[ISSUER].with_fetched_keys(vec![fetched]);
        issuer.keys.retain(|k| k.from_jwks_url); // only the fetched key
        issuer.max_stale = Some(60);
        keys.issuers.insert(ISSUER.into(), Arc::new(issuer));
        keys
    }

    /// The endpoint has failed since: the last successful fetch is long past.
    fn fetch_long_ago(keys: &mut KeySets) {
        let mut stale = keys.issuers[ISSUER].with_blocked_kid("none", false);
        stale.fetched_at = Some(1_000);
        keys.issuers.insert(ISSUER.into(), Arc::new(stale));
    }

    /// A verified-token cache keyed by key-set version would keep accepting a token verified
    /// while the keys were fresh: staleness changes no version. Its entries are checked.
    #[test]
    fn a_token_verified_while_the_keys_were_fresh_is_not_taken_from_a_cache_once_they_are_stale() {
        let mut keys = only_a_fetched_key();
        let t = token(json!({ "iss": ISSUER, "sub": "a", "exp": later() }));
        let verified = keys.verify_signature(&t).unwrap();
        assert!(keys.still_valid(&verified, crate::unix_now()));
        fetch_long_ago(&mut keys);
        assert!(!keys.still_valid(&verified, crate::unix_now()), "a stale key's earlier verification was still taken");
        assert_eq!(reason(&keys, &t), "jwks_stale");
    }
}
