//! The fleet's desired state as it is stored: one key per item in a JetStream KV bucket, so
//! concurrent writers never read-modify-write, and the bucket's revision is the fleet's
//! version.
//!
//! | key | value |
//! |---|---|
//! | `policy.<id>` | `{"module": "oci://HOST/REPO@sha256:…"}` (a tag is allowed and pinned when applied), or `{"module": "fleet:sha256:…"}`: a module in the fleet's object store |
//! | `data.<id>` | the policy's data document (JSON) |
//! | `shadow.<id>` | the shadow candidate of policy `<id>`, as `policy.<id>` |
//! | `route.<name>` | `{"host": "…", "path_prefix": "/…", "policy": "<id>"}` (`host` optional) |
//! | `issuer.<base64url iss>` | `{"audiences": […], "algorithms": […], "leeway_secs": N, "jwks": {"keys": […]}}` |
//! | `keys.<base64url iss>` | a JWKS: the static keys of an issuer (configured or from the fleet) |
//! | `revoke.jti.<base64url jti>` | `{"until": UNIX_SECONDS}` or `{}` (until removed) |
//! | `revoke.sub.<base64url subject>` | the same, for every token of a subject |

use base64::Engine;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The value of a `policy.<id>` key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyItem {
    /// `oci://…` reference of the module.
    pub module: String,
}

/// The prefix of a module in the fleet's object store: `fleet:sha256:<hex>`.
pub const FLEET_OBJECT: &str = "fleet:";

/// The value of a `route.<name>` key. Fleet routes are tried before the sidecar's configured
/// ones, most specific first: a route naming a host before one that does not, then the longer
/// path prefix, then by name. So the order never depends on which writer came last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteItem {
    /// The request's host (without port); absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The path prefix, matched on segment boundaries.
    #[serde(default = "root")]
    pub path_prefix: String,
    /// The policy id.
    pub policy: String,
}

fn root() -> String {
    "/".into()
}

/// The value of an `issuer.<iss>` key: an issuer whose keys travel with it. No JWKS endpoint
/// (a sidecar fetches only for issuers in its own configuration) and no shared secrets (a
/// bucket's readers could sign tokens with them).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerItem {
    /// Accepted audiences; at least one.
    pub audiences: Vec<String>,
    /// Accepted algorithms, e.g. `["RS256", "ES256"]`.
    pub algorithms: Vec<String>,
    /// Clock leeway for `exp`/`nbf`, in seconds.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// The issuer's public keys.
    pub jwks: jsonwebtoken::jwk::JwkSet,
}

fn default_leeway() -> u64 {
    30
}

/// The value of a `revoke.*` key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationItem {
    /// Unix seconds after which the revocation no longer applies (the token has expired by
    /// then); absent: until the key is removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
}

/// One parsed key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// `policy.<id>`.
    Policy(String),
    /// `data.<id>`.
    Data(String),
    /// `shadow.<id>`.
    Shadow(String),
    /// `route.<name>`.
    Route(String),
    /// `issuer.<iss>` (decoded).
    Issuer(String),
    /// `keys.<iss>` (decoded).
    Keys(String),
    /// `revoke.jti.<jti>` (decoded).
    RevokedJti(String),
    /// `revoke.sub.<subject>` (decoded).
    RevokedSubject(String),
    /// A `revoke.…`, `issuer.…` or `keys.…` key whose id cannot be decoded: reported, never
    /// silently ignored.
    Unreadable(String),
}

impl Key {
    /// The KV key for this item.
    pub fn encode(&self) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s.as_bytes());
        match self {
            Key::Policy(id) => format!("policy.{id}"),
            Key::Data(id) => format!("data.{id}"),
            Key::Shadow(id) => format!("shadow.{id}"),
            Key::Route(name) => format!("route.{name}"),
            Key::Issuer(iss) => format!("issuer.{}", b64(iss)),
            Key::Keys(iss) => format!("keys.{}", b64(iss)),
            Key::RevokedJti(jti) => format!("revoke.jti.{}", b64(jti)),
            Key::RevokedSubject(sub) => format!("revoke.sub.{}", b64(sub)),
            Key::Unreadable(key) => key.clone(),
        }
    }

    /// Parse a KV key; `None` for keys this version does not know (kept, ignored).
    pub fn parse(key: &str) -> Option<Key> {
        // Unpadded base64url as written here; padded base64url as other clients may write it.
        let decode = |s: &str| {
            let engine = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
            engine
                .decode(s)
                .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(s))
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
        };
        if let Some(id) = key.strip_prefix("policy.") {
            return Some(Key::Policy(id.to_owned()));
        }
        if let Some(id) = key.strip_prefix("data.") {
            return Some(Key::Data(id.to_owned()));
        }
        if let Some(id) = key.strip_prefix("shadow.") {
            return Some(Key::Shadow(id.to_owned()));
        }
        if let Some(name) = key.strip_prefix("route.") {
            return Some(Key::Route(name.to_owned()));
        }
        if let Some(iss) = key.strip_prefix("issuer.") {
            return Some(decode(iss).map_or_else(|| Key::Unreadable(key.to_owned()), Key::Issuer));
        }
        if let Some(iss) = key.strip_prefix("keys.") {
            return Some(decode(iss).map_or_else(|| Key::Unreadable(key.to_owned()), Key::Keys));
        }
        if let Some(jti) = key.strip_prefix("revoke.jti.") {
            return Some(decode(jti).map_or_else(|| Key::Unreadable(key.to_owned()), Key::RevokedJti));
        }
        if let Some(sub) = key.strip_prefix("revoke.sub.") {
            return Some(decode(sub).map_or_else(|| Key::Unreadable(key.to_owned()), Key::RevokedSubject));
        }
        if key.starts_with("revoke.") {
            return Some(Key::Unreadable(key.to_owned()));
        }
        None
    }
}

/// Every item of the bucket as of `revision`: what a sidecar applies, and caches on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// The bucket revision this state is complete up to.
    pub revision: u64,
    /// Key → (value, the revision it was written at).
    pub items: BTreeMap<String, (String, u64)>,
    /// Which bucket the revisions are of: its stream's creation time (nanoseconds since the
    /// epoch). A bucket deleted and made again numbers its revisions anew, so a revision means
    /// something only with this; absent in a state cached before it was recorded.
    #[serde(default)]
    pub bucket: Option<String>,
}

impl DesiredState {
    /// Record a put of `value` at `revision`.
    pub fn put(&mut self, key: String, value: &[u8], revision: u64) {
        self.items.insert(key, (String::from_utf8_lossy(value).into_owned(), revision));
        self.revision = self.revision.max(revision);
    }

    /// Record a delete (or purge) at `revision`.
    pub fn delete(&mut self, key: &str, revision: u64) {
        self.items.remove(key);
        self.revision = self.revision.max(revision);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_whatever_the_token_id_holds() {
        for key in [
            Key::Policy("rbac".into()),
            Key::Data("rbac.v2".into()),
            Key::RevokedJti("a.b/c d*>".into()),
            Key::RevokedSubject("user@example.com".into()),
            Key::Shadow("rbac".into()),
            Key::Route("api-v2".into()),
            Key::Issuer("https://issuer.example/tenant 1".into()),
            Key::Keys("https://issuer.example".into()),
        ] {
            let encoded = key.encode();
            assert!(encoded.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)), "{encoded}");
            assert_eq!(Key::parse(&encoded), Some(key));
        }
        assert_eq!(Key::parse("routes.0"), None);
        assert_eq!(Key::parse("keys.***"), Some(Key::Unreadable("keys.***".into())));
        assert_eq!(Key::parse("revoke.jti.!!"), Some(Key::Unreadable("revoke.jti.!!".into())));
        assert_eq!(Key::parse("revoke.jti.YWJj"), Some(Key::RevokedJti("abc".into())));
        assert_eq!(Key::parse("revoke.jti.YWI="), Some(Key::RevokedJti("ab".into())));
    }
}
