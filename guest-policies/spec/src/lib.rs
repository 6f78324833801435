//! The JSON forms Sandgate reads from people: a check request (for `sandgate eval` and fixture
//! files), a fixture file of cases with expected decisions, and the extraction of standard
//! claims from a JWT payload.
//!
//! Both the policy SDK's native test runner and the host use these, so a fixture file means the
//! same thing whether a policy runs as native Rust or as Wasm inside the real runtime.

use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// A check request as JSON. Only `path` is required.
///
/// ```json
/// { "method": "GET", "path": "/api/orders", "query": "page=2", "host": "shop.example",
///   "headers": { "x-request-id": "abc" },
///   "claims": { "iss": "https://issuer.example", "sub": "alice", "roles": ["reader"] } }
/// ```
///
/// `claims` are treated as a credential the host has already verified; `credential_error`
/// simulates a rejected credential instead. Neither means no credential.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSpec {
    /// HTTP method; default `GET`.
    #[serde(default = "default_method")]
    pub method: String,
    /// `http` or `https`; default `https`.
    #[serde(default = "default_scheme")]
    pub scheme: String,
    /// Host the client asked for; default `localhost`.
    #[serde(default = "default_host")]
    pub host: String,
    /// Request path, starting with `/`.
    pub path: String,
    /// Query string without `?`.
    #[serde(default)]
    pub query: Option<String>,
    /// Headers: name → value, or name → list of values.
    #[serde(default)]
    pub headers: BTreeMap<String, HeaderValues>,
    /// Client address `ip:port`.
    #[serde(default)]
    pub peer: Option<String>,
    /// Request body as text.
    #[serde(default)]
    pub body: Option<String>,
    /// Claims of a credential to treat as verified.
    #[serde(default)]
    pub claims: Option<Map<String, Value>>,
    /// A credential rejection to simulate.
    #[serde(default)]
    pub credential_error: Option<CredentialErrorSpec>,
    /// Pinned time of the check, Unix seconds; defaults to the fixture file's `now`, then to
    /// the current time.
    #[serde(default)]
    pub now: Option<u64>,
}

fn default_method() -> String {
    "GET".into()
}
fn default_scheme() -> String {
    "https".into()
}
fn default_host() -> String {
    "localhost".into()
}

impl RequestSpec {
    /// Headers as `(lowercase name, value)` pairs, in name order.
    pub fn header_pairs(&self) -> Vec<(String, String)> {
        let mut pairs = Vec::new();
        for (name, values) in &self.headers {
            let name = name.to_ascii_lowercase();
            match values {
                HeaderValues::One(v) => pairs.push((name, v.clone())),
                HeaderValues::Many(vs) => pairs.extend(vs.iter().map(|v| (name.clone(), v.clone()))),
            }
        }
        pairs
    }
}

/// One header value or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum HeaderValues {
    /// A single value.
    One(String),
    /// The header repeated.
    Many(Vec<String>),
}

/// A simulated credential rejection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialErrorSpec {
    /// Reason code, e.g. `token_expired`.
    pub reason: String,
    /// Message; defaults to the reason.
    #[serde(default)]
    pub message: Option<String>,
}

/// The registered claims of a token, typed. Mirrors the WIT record `standard-claims`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StandardClaims {
    /// `iss`.
    pub issuer: String,
    /// `sub`, empty when absent.
    pub subject: String,
    /// `aud` as a list.
    pub audiences: Vec<String>,
    /// `exp`.
    pub expires_at: Option<u64>,
    /// `iat`.
    pub issued_at: Option<u64>,
    /// `jti`.
    pub token_id: Option<String>,
    /// `scope` (space-separated) or `scp` (list).
    pub scopes: Vec<String>,
    /// `roles` (list or space-separated string).
    pub roles: Vec<String>,
}

impl StandardClaims {
    /// Extract the standard claims from a JWT payload. Claims of the wrong type are ignored
    /// (treated as absent), never guessed at.
    pub fn from_claims(claims: &Map<String, Value>) -> Self {
        let string = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_owned);
        let number = |name: &str| claims.get(name).and_then(Value::as_u64);
        StandardClaims {
            issuer: string("iss").unwrap_or_default(),
            subject: string("sub").unwrap_or_default(),
            audiences: string_list(claims.get("aud")),
            expires_at: number("exp"),
            issued_at: number("iat"),
            token_id: string("jti"),
            scopes: match claims.get("scope") {
                Some(v) => string_list(Some(v)),
                None => string_list(claims.get("scp")),
            },
            roles: string_list(claims.get("roles")),
        }
    }
}

/// A string (split on spaces) or a list of strings; anything else is empty.
fn string_list(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

/// A fixture file: a policy's data document and a table of cases.
///
/// ```json
/// { "data": { "roles": { "reader": [{ "methods": ["GET"], "paths": ["/api/**"] }] } },
///   "now": 1767225600,
///   "cases": [
///     { "name": "reader may read",
///       "request": { "path": "/api/orders", "claims": { "sub": "alice", "roles": ["reader"] } },
///       "expect": { "decision": "allow", "headers": { "x-user": "alice" } } },
///     { "name": "reader may not write",
///       "request": { "method": "POST", "path": "/api/orders", "claims": { "sub": "alice", "roles": ["reader"] } },
///       "expect": { "decision": "deny", "status": 403, "reason": "forbidden" } } ] }
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureFile {
    /// The policy's data document for every case (a case may override it).
    #[serde(default)]
    pub data: Option<Value>,
    /// Default pinned time for every case, Unix seconds.
    #[serde(default)]
    pub now: Option<u64>,
    /// The cases, run in order.
    pub cases: Vec<Case>,
}

impl FixtureFile {
    /// Parse a fixture file, with a message that names the line and column of a mistake.
    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

/// One fixture case.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// A name that says what the case shows; reported on failure.
    pub name: String,
    /// The request to check.
    pub request: RequestSpec,
    /// Data document for this case only.
    #[serde(default)]
    pub data: Option<Value>,
    /// The decision the policy must give.
    pub expect: Expect,
}

/// The expected decision of a case.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "decision", rename_all = "lowercase", deny_unknown_fields)]
pub enum Expect {
    /// The request must be allowed, setting at least these upstream headers.
    Allow {
        /// Headers the allow must set, name → value (others may be set too).
        #[serde(default)]
        headers: BTreeMap<String, String>,
    },
    /// The request must be denied.
    Deny {
        /// The status, if the case cares.
        #[serde(default)]
        status: Option<u16>,
        /// The reason code, if the case cares.
        #[serde(default)]
        reason: Option<String>,
    },
}

/// A decision reduced to what a fixture can assert on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Allowed, with the headers set upstream.
    Allow {
        /// `(name, value)` set on the upstream request.
        headers: Vec<(String, String)>,
    },
    /// Denied.
    Deny {
        /// HTTP status.
        status: u16,
        /// Reason code.
        reason: String,
        /// Message.
        message: String,
    },
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Allow { headers } => {
                write!(f, "allow")?;
                for (name, value) in headers {
                    write!(f, " {name}={value:?}")?;
                }
                Ok(())
            }
            Outcome::Deny { status, reason, message } => write!(f, "deny {status} `{reason}` ({message})"),
        }
    }
}

impl Expect {
    /// `Ok` if `got` satisfies this expectation, else what differs.
    pub fn check(&self, got: &Outcome) -> Result<(), String> {
        match (self, got) {
            (Expect::Allow { headers: want }, Outcome::Allow { headers }) => {
                for (name, value) in want {
                    let name = name.to_ascii_lowercase();
                    match headers.iter().find(|(n, _)| *n == name) {
                        Some((_, v)) if v == value => {}
                        Some((_, v)) => return Err(format!("header `{name}`: expected {value:?}, got {v:?}")),
                        None => return Err(format!("header `{name}`: expected {value:?}, not set")),
                    }
                }
                Ok(())
            }
            (Expect::Deny { status: want_status, reason: want_reason }, Outcome::Deny { status, reason, .. }) => {
                if let Some(s) = want_status.filter(|s| s != status) {
                    return Err(format!("expected status {s}, got {status}"));
                }
                if let Some(r) = want_reason.as_ref().filter(|r| *r != reason) {
                    return Err(format!("expected reason `{r}`, got `{reason}`"));
                }
                Ok(())
            }
            (Expect::Allow { .. }, got) => Err(format!("expected allow, got {got}")),
            (Expect::Deny { .. }, got) => Err(format!("expected deny, got {got}")),
        }
    }
}

/// The claim `name` of `claims_json` (a JSON object of claims, as the host hands a policy the
/// claims of a verified token), or `None` when it has no such claim or is not an object. The
/// host answers a policy's `claim(name)` with it, and the SDK a policy that has read the whole
/// credential.
pub fn claim(claims_json: &str, name: &str) -> Option<Value> {
    use serde::de::DeserializeSeed;
    ClaimLookup(name).deserialize(&mut serde_json::Deserializer::from_str(claims_json)).ok().flatten()
}

/// Finds one claim in the claims JSON, building a value for it alone: every other claim is
/// skipped without being parsed into a value (a fresh instance parses the claims on every
/// check). A claim given twice is its last value, as when parsing the whole object.
struct ClaimLookup<'n>(&'n str);

impl<'de> serde::de::DeserializeSeed<'de> for ClaimLookup<'_> {
    type Value = Option<Value>;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ClaimLookup<'_> {
    type Value = Option<Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object of claims")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == self.0 {
                found = Some(map.next_value()?);
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn standard_claims_accept_both_scope_forms_and_ignore_wrong_types() {
        let c = json!({"iss": "i", "sub": "s", "aud": "a", "exp": 10, "scope": "read write", "roles": ["x"]});
        let claims = StandardClaims::from_claims(c.as_object().unwrap());
        assert_eq!(claims.audiences, vec!["a"]);
        assert_eq!(claims.scopes, vec!["read", "write"]);
        assert_eq!(claims.roles, vec!["x"]);
        assert_eq!(claims.expires_at, Some(10));

        let c = json!({"scp": ["a", "b"], "exp": "soon", "sub": 42});
        let claims = StandardClaims::from_claims(c.as_object().unwrap());
        assert_eq!(claims.scopes, vec!["a", "b"]);
        assert_eq!(claims.expires_at, None);
        assert_eq!(claims.subject, "");
    }

    #[test]
    fn a_typo_in_a_fixture_names_the_field() {
        let err = FixtureFile::parse(r#"{"cases":[{"name":"x","request":{"path":"/"},"expct":{}}]}"#).unwrap_err();
        assert!(err.to_string().contains("expct"), "{err}");
    }

    #[test]
    fn expectations_compare_what_they_name() {
        let allow = Outcome::Allow { headers: vec![("x-user".into(), "alice".into())] };
        let deny = Outcome::Deny { status: 403, reason: "forbidden".into(), message: String::new() };
        let want_alice = Expect::Allow { headers: [("X-User".to_string(), "alice".to_string())].into() };
        assert!(want_alice.check(&allow).is_ok());
        assert!(want_alice.check(&deny).unwrap_err().contains("expected allow"));
        let want_bob = Expect::Allow { headers: [("x-user".to_string(), "bob".to_string())].into() };
        assert!(want_bob.check(&allow).is_err());
        let want_401 = Expect::Deny { status: Some(401), reason: None };
        assert!(want_401.check(&deny).unwrap_err().contains("401"));
        assert!(Expect::Deny { status: Some(403), reason: Some("forbidden".into()) }.check(&deny).is_ok());
    }
}
