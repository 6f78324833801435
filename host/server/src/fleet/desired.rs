//! The fleet's desired state as it is stored: one key per item in a JetStream KV bucket, so
//! concurrent writers never read-modify-write, and the bucket's revision is the fleet's
//! version.
//!
//! | key | value |
//! |---|---|
//! | `policy.<id>` | `{"module": "oci://HOST/REPO@sha256:…"}` (a tag is allowed and pinned when applied) |
//! | `data.<id>` | the policy's data document (JSON) |
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
    /// `revoke.jti.<jti>` (decoded).
    RevokedJti(String),
    /// `revoke.sub.<subject>` (decoded).
    RevokedSubject(String),
    /// A `revoke.…` key whose id cannot be decoded: reported, never silently ignored.
    Unreadable(String),
}

impl Key {
    /// The KV key for this item.
    pub fn encode(&self) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s.as_bytes());
        match self {
            Key::Policy(id) => format!("policy.{id}"),
            Key::Data(id) => format!("data.{id}"),
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
        ] {
            let encoded = key.encode();
            assert!(encoded.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)), "{encoded}");
            assert_eq!(Key::parse(&encoded), Some(key));
        }
        assert_eq!(Key::parse("routes.0"), None);
        assert_eq!(Key::parse("revoke.jti.!!"), Some(Key::Unreadable("revoke.jti.!!".into())));
        assert_eq!(Key::parse("revoke.jti.YWJj"), Some(Key::RevokedJti("abc".into())));
        assert_eq!(Key::parse("revoke.jti.YWI="), Some(Key::RevokedJti("ab".into())));
    }
}
