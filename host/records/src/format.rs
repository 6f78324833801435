//! The decision record, version 1: one JSON object a line. `docs/decision-record.schema.json`
//! is its schema; this module is the reference.
//!
//! Every line carries the metadata of the decision (request id, policy, module and data
//! digests, snapshot versions, fleet revision, outcome, reason, the policy's log lines).
//! With `capture = "input"` it also carries [`Input`], the check exactly as the policy saw it
//! (secret headers redacted), and [`DecisionRecord`], the policy's whole answer: enough to run
//! the same module on the same data and compare.

use crate::line;
use sandgate_runtime::bindings::sandgate::policy::types::{
    CheckRequest, Credential, CredentialError, Decision, Header, SnapshotVersions, StandardClaims, VerifiedCredential,
};
use serde::{Deserialize, Serialize};

/// The record format version written in every line as `"v"`.
pub const FORMAT_VERSION: u32 = 1;

/// What a redacted header's value is replaced with.
pub const REDACTED: &str = "[redacted]";

/// Headers always redacted in a captured input: they carry credentials.
pub const ALWAYS_REDACTED: [&str; 4] = ["authorization", "proxy-authorization", "cookie", "set-cookie"];

/// The check as the policy saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// HTTP method, uppercase.
    pub method: String,
    /// `http` or `https`.
    pub scheme: String,
    /// The host asked for.
    pub host: String,
    /// The canonical path.
    pub path: String,
    /// The query string without `?`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// Every header as `[name, value]`, in order; credentials redacted.
    pub headers: Vec<(String, String)>,
    /// The client's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The body the proxy sent, base64 (standard, padded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// The host's verdict on the bearer token (the claims, never the token).
    pub credential: CredentialRecord,
    /// The pinned time, Unix seconds.
    pub now: u64,
    /// The pinned versions, as the policy received them.
    pub versions: Versions,
    /// The answers of the policy's `verify-jwt` calls, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verify_jwt: Vec<VerifyAnswer>,
}

/// The host's verdict on the bearer token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CredentialRecord {
    /// No credential.
    None,
    /// Verified: its claims.
    Verified(VerifiedRecord),
    /// Rejected: why.
    Rejected(ErrorRecord),
}

/// A verified credential: the key that verified it and its claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifiedRecord {
    /// The `kid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// The algorithm.
    pub algorithm: String,
    /// `iss`.
    pub issuer: String,
    /// `sub`.
    pub subject: String,
    /// `aud`.
    pub audiences: Vec<String>,
    /// `exp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// `iat`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<u64>,
    /// `jti`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    /// Scopes.
    pub scopes: Vec<String>,
    /// Roles.
    pub roles: Vec<String>,
    /// Every claim, as the JSON text the policy received.
    pub claims_json: String,
}

/// Why a credential was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorRecord {
    /// The reason code.
    pub reason: String,
    /// The message.
    pub message: String,
}

/// One answer of `verify-jwt`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VerifyAnswer {
    /// The token was verified.
    Verified(VerifiedRecord),
    /// It was not.
    Rejected(ErrorRecord),
}

/// The pinned versions a policy receives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Versions {
    /// The snapshot.
    pub snapshot: u64,
    /// SHA-256 of the module (hex).
    pub policy_digest: String,
    /// The key sets.
    pub key_set: u64,
    /// The revocations.
    pub revocations: u64,
    /// The data document.
    pub data: u64,
}

/// A policy's whole answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case", deny_unknown_fields)]
pub enum DecisionRecord {
    /// Allowed.
    Allow {
        /// Headers set on the upstream request.
        set_headers: Vec<(String, String)>,
        /// Headers removed from it.
        remove_headers: Vec<String>,
    },
    /// Denied.
    Deny {
        /// The status.
        status: u16,
        /// The reason code.
        reason: String,
        /// The message.
        message: String,
        /// Headers on the denial.
        headers: Vec<(String, String)>,
    },
}

/// One line of the decision log, as replay reads it (fields it does not need are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct Record {
    /// The format version; absent in lines older than version 1.
    #[serde(default)]
    pub v: Option<u32>,
    /// Sandgate's id of the check.
    #[serde(default)]
    pub request_id: String,
    /// The policy id, when a route chose one.
    #[serde(default)]
    pub policy: Option<String>,
    /// SHA-256 of the module (hex), when a policy ran.
    #[serde(default)]
    pub policy_digest: Option<String>,
    /// `sha256:…` of the data document's JSON text, when a policy ran.
    #[serde(default)]
    pub data_digest: Option<String>,
    /// Whether the check started from the policy's memory prepared for its data (absent:
    /// from the component as built).
    #[serde(default)]
    pub prepared: bool,
    /// Where the module came from: `oci://HOST/REPO@sha256:…` or `fleet:sha256:…`.
    #[serde(default)]
    pub policy_source: Option<String>,
    /// The route that chose the policy: `[host]/prefix`, or `default` (`capture = "input"`).
    #[serde(default)]
    pub route: Option<String>,
    /// The method (for reports).
    #[serde(default)]
    pub method: String,
    /// The host (for reports).
    #[serde(default)]
    pub host: String,
    /// The path (for reports).
    #[serde(default)]
    pub path: String,
    /// `allow` or `deny`.
    #[serde(default)]
    pub outcome: String,
    /// The status answered.
    #[serde(default)]
    pub status: u16,
    /// The reason code.
    #[serde(default)]
    pub reason: String,
    /// Set when the host, not the policy, decided because the policy failed.
    #[serde(default)]
    pub fault: Option<String>,
    /// The check as the policy saw it (`capture = "input"`).
    #[serde(default)]
    pub input: Option<Input>,
    /// The policy's whole answer (`capture = "input"`).
    #[serde(default)]
    pub decision: Option<DecisionRecord>,
    /// A shadow candidate's disagreement line, not a decision.
    #[serde(default)]
    pub shadow_disagreement: Option<bool>,
    /// The credential's verdict: `none`, `verified`, or the rejection's reason code.
    #[serde(default)]
    pub credential: Option<String>,
    /// The verified credential's subject.
    #[serde(default)]
    pub subject: Option<String>,
}

/// The longest method, host and path a record's summary carries (its `input` has them whole).
pub const SUMMARY_BOUNDS: (usize, usize, usize) = (32, 256, 2048);

/// `text` cut to at most `max` bytes, at a character boundary: how a record's summary strings
/// are cut.
pub fn bounded(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Whether a header's value is redacted in a captured input: one of [`ALWAYS_REDACTED`], or
/// of `redact` (lowercase names).
fn is_redacted(name: &str, redact: &[String]) -> bool {
    ALWAYS_REDACTED.contains(&name) || redact.iter().any(|r| r == name)
}

/// Reason codes of denials the host made because of its own condition, not the policy's
/// behaviour: not reproducible by replay.
pub const HOST_CONDITIONS: [&str; 2] = ["overloaded", "policy_instantiation_failed"];

impl Input {
    /// Capture `check` as the policy saw it, redacting [`ALWAYS_REDACTED`] and `redact`
    /// (lowercase names).
    pub fn capture(check: &CheckRequest, redact: &[String], verify_jwt: Vec<VerifyAnswer>) -> Input {
        use base64::Engine;
        let secret = |name: &str| is_redacted(name, redact);
        Input {
            method: check.method.clone(),
            scheme: check.scheme.clone(),
            host: check.host.clone(),
            path: check.path.clone(),
            query: check.query.clone(),
            headers: check
                .headers
                .iter()
                .map(|h| (h.name.clone(), if secret(&h.name) { REDACTED.to_owned() } else { h.value.clone() }))
                .collect(),
            peer: check.peer.clone(),
            body: check.body.as_ref().map(|b| base64::engine::general_purpose::STANDARD.encode(b)),
            credential: match &check.credential {
                Credential::None => CredentialRecord::None,
                Credential::Verified(v) => CredentialRecord::Verified(VerifiedRecord::from(v)),
                Credential::Rejected(e) => CredentialRecord::Rejected(ErrorRecord::from(e)),
            },
            now: check.now,
            versions: Versions {
                snapshot: check.versions.snapshot,
                policy_digest: check.versions.policy_digest.clone(),
                key_set: check.versions.key_set,
                revocations: check.versions.revocations,
                data: check.versions.data,
            },
            verify_jwt,
        }
    }

    /// The check request this input describes, with `request_id`; `None` if the body is not
    /// base64.
    pub fn to_check(&self, request_id: &str) -> Option<CheckRequest> {
        use base64::Engine;
        let body = match &self.body {
            Some(b) => Some(base64::engine::general_purpose::STANDARD.decode(b).ok()?),
            None => None,
        };
        Some(CheckRequest {
            request_id: request_id.to_owned(),
            method: self.method.clone(),
            scheme: self.scheme.clone(),
            host: self.host.clone(),
            path: self.path.clone(),
            query: self.query.clone(),
            headers: self
                .headers
                .iter()
                .map(|(name, value)| Header { name: name.clone(), value: value.clone() })
                .collect(),
            peer: self.peer.clone(),
            body,
            credential: match &self.credential {
                CredentialRecord::None => Credential::None,
                CredentialRecord::Verified(v) => Credential::Verified(v.to_credential()),
                CredentialRecord::Rejected(e) => Credential::Rejected(e.to_error()),
            },
            now: self.now,
            versions: SnapshotVersions {
                snapshot: self.versions.snapshot,
                policy_digest: self.versions.policy_digest.clone(),
                key_set: self.versions.key_set,
                revocations: self.versions.revocations,
                data: self.versions.data,
            },
        })
    }
}

impl From<&VerifiedCredential> for VerifiedRecord {
    fn from(v: &VerifiedCredential) -> Self {
        let c = &v.claims;
        VerifiedRecord {
            key_id: v.key_id.clone(),
            algorithm: v.algorithm.clone(),
            issuer: c.issuer.clone(),
            subject: c.subject.clone(),
            audiences: c.audiences.clone(),
            expires_at: c.expires_at,
            issued_at: c.issued_at,
            token_id: c.token_id.clone(),
            scopes: c.scopes.clone(),
            roles: c.roles.clone(),
            claims_json: v.claims_json.clone(),
        }
    }
}

impl VerifiedRecord {
    /// As the WIT `verified-credential`.
    pub fn to_credential(&self) -> VerifiedCredential {
        VerifiedCredential {
            key_id: self.key_id.clone(),
            algorithm: self.algorithm.clone(),
            claims: StandardClaims {
                issuer: self.issuer.clone(),
                subject: self.subject.clone(),
                audiences: self.audiences.clone(),
                expires_at: self.expires_at,
                issued_at: self.issued_at,
                token_id: self.token_id.clone(),
                scopes: self.scopes.clone(),
                roles: self.roles.clone(),
            },
            claims_json: self.claims_json.clone(),
        }
    }
}

impl From<&CredentialError> for ErrorRecord {
    fn from(e: &CredentialError) -> Self {
        ErrorRecord { reason: e.reason.clone(), message: e.message.clone() }
    }
}

impl ErrorRecord {
    /// As the WIT `credential-error`.
    pub fn to_error(&self) -> CredentialError {
        CredentialError { reason: self.reason.clone(), message: self.message.clone() }
    }
}

impl From<&Result<VerifiedCredential, CredentialError>> for VerifyAnswer {
    fn from(answer: &Result<VerifiedCredential, CredentialError>) -> Self {
        match answer {
            Ok(v) => VerifyAnswer::Verified(VerifiedRecord::from(v)),
            Err(e) => VerifyAnswer::Rejected(ErrorRecord::from(e)),
        }
    }
}

impl From<&Decision> for DecisionRecord {
    fn from(decision: &Decision) -> Self {
        let pairs = |headers: &[Header]| headers.iter().map(|h| (h.name.clone(), h.value.clone())).collect();
        match decision {
            Decision::Allow(a) => {
                DecisionRecord::Allow { set_headers: pairs(&a.set_headers), remove_headers: a.remove_headers.clone() }
            }
            Decision::Deny(d) => DecisionRecord::Deny {
                status: d.status,
                reason: d.reason.clone(),
                message: d.message.clone(),
                headers: pairs(&d.headers),
            },
        }
    }
}

/// [`Input`] borrowed from the check it describes: serializes to exactly the JSON
/// `Input::capture(check, redact, verify_jwt)` does, without copying the check first. The
/// decision log writes this on every check with `capture = "input"`.
pub struct InputView<'a> {
    check: &'a CheckRequest,
    redact: &'a [String],
    verify_jwt: &'a [VerifyAnswer],
    body: Option<&'a [u8]>,
}

impl<'a> InputView<'a> {
    /// `check` as the policy saw it, redacting [`ALWAYS_REDACTED`] and `redact` (lowercase
    /// names), with the answers of its `verify-jwt` calls.
    pub fn new(check: &'a CheckRequest, redact: &'a [String], verify_jwt: &'a [VerifyAnswer]) -> Self {
        InputView { check, redact, verify_jwt, body: check.body.as_deref() }
    }

    /// The same view writing `body` instead of the check's (one with secrets taken out: a
    /// body is written as base64, where they could not be found afterwards).
    pub fn with_body(mut self, body: &'a [u8]) -> Self {
        self.body = Some(body);
        self
    }
}

impl Serialize for InputView<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let c = self.check;
        let mut s = serializer.serialize_struct("Input", 12)?;
        s.serialize_field("method", &c.method)?;
        s.serialize_field("scheme", &c.scheme)?;
        s.serialize_field("host", &c.host)?;
        s.serialize_field("path", &c.path)?;
        match &c.query {
            Some(query) => s.serialize_field("query", query)?,
            None => s.skip_field("query")?,
        }
        s.serialize_field("headers", &RedactedHeaders { headers: &c.headers, redact: self.redact })?;
        match &c.peer {
            Some(peer) => s.serialize_field("peer", peer)?,
            None => s.skip_field("peer")?,
        }
        match self.body {
            Some(body) => s.serialize_field("body", &Base64(body))?,
            None => s.skip_field("body")?,
        }
        s.serialize_field("credential", &CredentialView(&c.credential))?;
        s.serialize_field("now", &c.now)?;
        s.serialize_field("versions", &VersionsView(&c.versions))?;
        if self.verify_jwt.is_empty() {
            s.skip_field("verify_jwt")?;
        } else {
            s.serialize_field("verify_jwt", self.verify_jwt)?;
        }
        s.end()
    }
}

impl InputView<'_> {
    /// Append the view's JSON to `out`: the same bytes its `Serialize` impl writes through
    /// `serde_json`, written directly ([`crate::line`]).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let c = self.check;
        let mut o = line::Object::new(out);
        o.str("method", &c.method);
        o.str("scheme", &c.scheme);
        o.str("host", &c.host);
        o.str("path", &c.path);
        o.some_str("query", c.query.as_deref());
        let secret = |name: &str| is_redacted(name, self.redact);
        o.pairs(
            "headers",
            c.headers.iter().map(|h| (h.name.as_str(), if secret(&h.name) { REDACTED } else { h.value.as_str() })),
        );
        o.some_str("peer", c.peer.as_deref());
        if let Some(body) = self.body {
            // Rare (a forwarded body), and base64 needs no escaping.
            let _ = serde_json::to_writer(&mut *o.key("body"), &Base64(body));
        }
        let credential = o.key("credential");
        let mut k = line::Object::new(credential);
        match &c.credential {
            Credential::None => k.str("kind", "none"),
            Credential::Verified(v) => {
                k.str("kind", "verified");
                let claims = &v.claims;
                k.some_str("key_id", v.key_id.as_deref());
                k.str("algorithm", &v.algorithm);
                k.str("issuer", &claims.issuer);
                k.str("subject", &claims.subject);
                k.strs("audiences", claims.audiences.iter().map(String::as_str));
                k.some_u64("expires_at", claims.expires_at);
                k.some_u64("issued_at", claims.issued_at);
                k.some_str("token_id", claims.token_id.as_deref());
                k.strs("scopes", claims.scopes.iter().map(String::as_str));
                k.strs("roles", claims.roles.iter().map(String::as_str));
                k.str("claims_json", &v.claims_json);
            }
            Credential::Rejected(e) => {
                k.str("kind", "rejected");
                k.str("reason", &e.reason);
                k.str("message", &e.message);
            }
        }
        k.end();
        o.u64("now", c.now);
        let versions = &c.versions;
        let mut v = line::Object::new(o.key("versions"));
        v.u64("snapshot", versions.snapshot);
        v.str("policy_digest", &versions.policy_digest);
        v.u64("key_set", versions.key_set);
        v.u64("revocations", versions.revocations);
        v.u64("data", versions.data);
        v.end();
        if !self.verify_jwt.is_empty() {
            // Rare (a policy calling `verify-jwt`): written by `serde_json`.
            let _ = serde_json::to_writer(&mut *o.key("verify_jwt"), self.verify_jwt);
        }
        o.end();
    }
}

/// Headers as `[name, value]` pairs, secret values replaced by [`REDACTED`].
struct RedactedHeaders<'a> {
    headers: &'a [Header],
    redact: &'a [String],
}

impl Serialize for RedactedHeaders<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let secret = |name: &str| is_redacted(name, self.redact);
        serializer.collect_seq(self.headers.iter().map(|h| {
            let value = if secret(&h.name) { REDACTED } else { h.value.as_str() };
            (h.name.as_str(), value)
        }))
    }
}

/// Bytes as standard padded base64, written without an intermediate string.
struct Base64<'a>(&'a [u8]);

impl Serialize for Base64<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&base64::display::Base64Display::new(self.0, &base64::engine::general_purpose::STANDARD))
    }
}

/// [`CredentialRecord`] borrowed from the WIT credential.
struct CredentialView<'a>(&'a Credential);

impl Serialize for CredentialView<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        match self.0 {
            Credential::None => {
                let mut s = serializer.serialize_struct("CredentialRecord", 1)?;
                s.serialize_field("kind", "none")?;
                s.end()
            }
            Credential::Verified(v) => {
                let mut s = serializer.serialize_struct("CredentialRecord", 12)?;
                s.serialize_field("kind", "verified")?;
                verified_fields(&mut s, v)?;
                s.end()
            }
            Credential::Rejected(e) => {
                let mut s = serializer.serialize_struct("CredentialRecord", 3)?;
                s.serialize_field("kind", "rejected")?;
                s.serialize_field("reason", &e.reason)?;
                s.serialize_field("message", &e.message)?;
                s.end()
            }
        }
    }
}

/// The fields of a [`VerifiedRecord`], in its order, from the WIT credential.
fn verified_fields<S: serde::ser::SerializeStruct>(s: &mut S, v: &VerifiedCredential) -> Result<(), S::Error> {
    let c = &v.claims;
    match &v.key_id {
        Some(key_id) => s.serialize_field("key_id", key_id)?,
        None => s.skip_field("key_id")?,
    }
    s.serialize_field("algorithm", &v.algorithm)?;
    s.serialize_field("issuer", &c.issuer)?;
    s.serialize_field("subject", &c.subject)?;
    s.serialize_field("audiences", &c.audiences)?;
    match c.expires_at {
        Some(at) => s.serialize_field("expires_at", &at)?,
        None => s.skip_field("expires_at")?,
    }
    match c.issued_at {
        Some(at) => s.serialize_field("issued_at", &at)?,
        None => s.skip_field("issued_at")?,
    }
    match &c.token_id {
        Some(id) => s.serialize_field("token_id", id)?,
        None => s.skip_field("token_id")?,
    }
    s.serialize_field("scopes", &c.scopes)?;
    s.serialize_field("roles", &c.roles)?;
    s.serialize_field("claims_json", &v.claims_json)
}

/// [`Versions`] borrowed from the WIT versions.
struct VersionsView<'a>(&'a SnapshotVersions);

impl Serialize for VersionsView<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let v = self.0;
        let mut s = serializer.serialize_struct("Versions", 5)?;
        s.serialize_field("snapshot", &v.snapshot)?;
        s.serialize_field("policy_digest", &v.policy_digest)?;
        s.serialize_field("key_set", &v.key_set)?;
        s.serialize_field("revocations", &v.revocations)?;
        s.serialize_field("data", &v.data)?;
        s.end()
    }
}

/// [`DecisionRecord`] borrowed from the policy's answer: serializes to exactly the JSON
/// `DecisionRecord::from(decision)` does.
pub struct DecisionView<'a>(pub &'a Decision);

impl Serialize for DecisionView<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        match self.0 {
            Decision::Allow(a) => {
                let mut s = serializer.serialize_struct("DecisionRecord", 3)?;
                s.serialize_field("decision", "allow")?;
                s.serialize_field("set_headers", &Pairs(&a.set_headers))?;
                s.serialize_field("remove_headers", &a.remove_headers)?;
                s.end()
            }
            Decision::Deny(d) => {
                let mut s = serializer.serialize_struct("DecisionRecord", 5)?;
                s.serialize_field("decision", "deny")?;
                s.serialize_field("status", &d.status)?;
                s.serialize_field("reason", &d.reason)?;
                s.serialize_field("message", &d.message)?;
                s.serialize_field("headers", &Pairs(&d.headers))?;
                s.end()
            }
        }
    }
}

impl DecisionView<'_> {
    /// Append the answer's JSON to `out`: the same bytes its `Serialize` impl writes through
    /// `serde_json`, written directly ([`crate::line`]).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        fn pairs(headers: &[Header]) -> impl Iterator<Item = (&str, &str)> {
            headers.iter().map(|h| (h.name.as_str(), h.value.as_str()))
        }
        let mut o = line::Object::new(out);
        match self.0 {
            Decision::Allow(a) => {
                o.str("decision", "allow");
                o.pairs("set_headers", pairs(&a.set_headers));
                o.strs("remove_headers", a.remove_headers.iter().map(String::as_str));
            }
            Decision::Deny(d) => {
                o.str("decision", "deny");
                o.u64("status", u64::from(d.status));
                o.str("reason", &d.reason);
                o.str("message", &d.message);
                o.pairs("headers", pairs(&d.headers));
            }
        }
        o.end();
    }
}

/// Headers as `[name, value]` pairs.
struct Pairs<'a>(&'a [Header]);

impl Serialize for Pairs<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|h| (h.name.as_str(), h.value.as_str())))
    }
}

impl DecisionRecord {
    /// `allow` (with the names of the headers it sets and removes), or
    /// `deny <status> <reason>`: how reports name an answer.
    pub fn summary(&self) -> String {
        match self {
            DecisionRecord::Allow { set_headers, remove_headers } => {
                let mut summary = String::from("allow");
                if !set_headers.is_empty() {
                    let names: Vec<&str> = set_headers.iter().map(|(n, _)| n.as_str()).collect();
                    summary.push_str(&format!(" setting {}", names.join(", ")));
                }
                if !remove_headers.is_empty() {
                    summary.push_str(&format!(" removing {}", remove_headers.join(", ")));
                }
                summary
            }
            DecisionRecord::Deny { status, reason, .. } => format!("deny {status} {reason}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check() -> CheckRequest {
        CheckRequest {
            request_id: "r-1".into(),
            method: "GET".into(),
            scheme: "https".into(),
            host: "api.example".into(),
            path: "/orders/7".into(),
            query: Some("a=1".into()),
            headers: vec![
                Header { name: "authorization".into(), value: "Bearer secret.token".into() },
                Header { name: "cookie".into(), value: "session=s".into() },
                Header { name: "x-api-key".into(), value: "k".into() },
                Header { name: "accept".into(), value: "*/*".into() },
            ],
            peer: Some("10.0.0.1:5000".into()),
            body: Some(b"{\"x\":1}".to_vec()),
            credential: Credential::Verified(VerifiedCredential {
                key_id: Some("k1".into()),
                algorithm: "ES256".into(),
                claims: StandardClaims {
                    issuer: "https://issuer".into(),
                    subject: "alice".into(),
                    audiences: vec!["api".into()],
                    expires_at: Some(10),
                    issued_at: None,
                    token_id: Some("j".into()),
                    scopes: vec![],
                    roles: vec!["reader".into()],
                },
                claims_json: r#"{"sub":"alice"}"#.into(),
            }),
            now: 5,
            versions: SnapshotVersions { snapshot: 3, policy_digest: "ab".into(), key_set: 2, revocations: 1, data: 4 },
        }
    }

    #[test]
    fn a_captured_input_is_the_check_with_secrets_redacted() {
        let check = check();
        let input = Input::capture(&check, &["x-api-key".into()], Vec::new());
        let text = serde_json::to_string(&input).unwrap_or_default();
        assert!(!text.contains("secret.token") && !text.contains("session=s") && !text.contains("\"k\""), "{text}");
        let back: Input = serde_json::from_str(&text).unwrap_or_else(|_| input.clone());
        assert_eq!(back, input);
        let replayed = back.to_check("r-1");
        let expected_headers: Vec<(String, String)> = vec![
            ("authorization".into(), REDACTED.into()),
            ("cookie".into(), REDACTED.into()),
            ("x-api-key".into(), REDACTED.into()),
            ("accept".into(), "*/*".into()),
        ];
        let replayed_headers: Vec<(String, String)> = replayed
            .as_ref()
            .map(|c| c.headers.iter().map(|h| (h.name.clone(), h.value.clone())).collect())
            .unwrap_or_default();
        assert_eq!(replayed_headers, expected_headers);
        // Everything but the redacted headers is the check itself.
        let same = replayed.is_some_and(|r| {
            r.body == check.body
                && r.query == check.query
                && r.now == check.now
                && r.versions.policy_digest == check.versions.policy_digest
                && matches!((&r.credential, &check.credential), (Credential::Verified(a), Credential::Verified(b))
                    if a.claims_json == b.claims_json && a.claims.roles == b.claims.roles && a.key_id == b.key_id)
        });
        assert!(same);
    }

    mod views {
        use super::super::*;
        use proptest::collection::vec;
        use proptest::option;
        use proptest::prelude::*;
        use sandgate_runtime::bindings::sandgate::policy::types::{AllowResponse, DenyResponse};

        /// Any text, escapes and non-ASCII included.
        fn text() -> impl Strategy<Value = String> {
            prop_oneof![".{0,12}", "[a-z\"\\\\\u{0}-\u{1f}é€😀]{0,8}"]
        }

        fn header() -> impl Strategy<Value = Header> {
            let name = prop_oneof![
                Just("authorization".to_owned()),
                Just("cookie".to_owned()),
                Just("x-api-key".to_owned()),
                "[a-z-]{1,10}"
            ];
            (name, text()).prop_map(|(name, value)| Header { name, value })
        }

        fn verified() -> impl Strategy<Value = VerifiedCredential> {
            let claims = (
                text(),
                text(),
                vec(text(), 0..3),
                option::of(any::<u64>()),
                option::of(any::<u64>()),
                option::of(text()),
                vec(text(), 0..3),
                vec(text(), 0..3),
            )
                .prop_map(
                    |(issuer, subject, audiences, expires_at, issued_at, token_id, scopes, roles)| StandardClaims {
                        issuer,
                        subject,
                        audiences,
                        expires_at,
                        issued_at,
                        token_id,
                        scopes,
                        roles,
                    },
                );
            (option::of(text()), text(), claims, text()).prop_map(|(key_id, algorithm, claims, claims_json)| {
                VerifiedCredential { key_id, algorithm, claims, claims_json }
            })
        }

        fn error() -> impl Strategy<Value = CredentialError> {
            (text(), text()).prop_map(|(reason, message)| CredentialError { reason, message })
        }

        fn credential() -> impl Strategy<Value = Credential> {
            prop_oneof![
                Just(Credential::None),
                verified().prop_map(Credential::Verified),
                error().prop_map(Credential::Rejected)
            ]
        }

        fn check() -> impl Strategy<Value = CheckRequest> {
            let versions = (any::<u64>(), text(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
                |(snapshot, policy_digest, key_set, revocations, data)| SnapshotVersions {
                    snapshot,
                    policy_digest,
                    key_set,
                    revocations,
                    data,
                },
            );
            (
                (text(), text(), text(), text(), option::of(text())),
                vec(header(), 0..6),
                option::of(text()),
                option::of(vec(any::<u8>(), 0..40)),
                credential(),
                any::<u64>(),
                versions,
            )
                .prop_map(
                    |((method, scheme, host, path, query), headers, peer, body, credential, now, versions)| {
                        CheckRequest {
                            request_id: "r".into(),
                            method,
                            scheme,
                            host,
                            path,
                            query,
                            headers,
                            peer,
                            body,
                            credential,
                            now,
                            versions,
                        }
                    },
                )
        }

        fn answers() -> impl Strategy<Value = Vec<VerifyAnswer>> {
            let answer = prop_oneof![verified().prop_map(Ok), error().prop_map(Err)];
            vec(answer, 0..3).prop_map(|answers| answers.iter().map(VerifyAnswer::from).collect())
        }

        fn decision() -> impl Strategy<Value = Decision> {
            prop_oneof![
                (vec(header(), 0..3), vec(text(), 0..3)).prop_map(|(set_headers, remove_headers)| {
                    Decision::Allow(AllowResponse { set_headers, remove_headers })
                }),
                (any::<u16>(), text(), text(), vec(header(), 0..3)).prop_map(|(status, reason, message, headers)| {
                    Decision::Deny(DenyResponse { status, reason, message, headers })
                }),
            ]
        }

        proptest! {
            /// The decision log writes the borrowed views (with their `write_json`); replay reads the
            /// owned records. All must be the same JSON, byte for byte.
            #[test]
            fn a_view_serializes_exactly_as_the_record_it_borrows_from(
                check in check(),
                redact in vec(prop_oneof![Just("x-api-key".to_owned()), "[a-z-]{1,10}"], 0..2),
                verify_jwt in answers(),
                decision in decision(),
            ) {
                let owned = serde_json::to_string(&Input::capture(&check, &redact, verify_jwt.clone())).unwrap_or_default();
                let view = serde_json::to_string(&InputView::new(&check, &redact, &verify_jwt)).unwrap_or_default();
                let mut written = Vec::new();
                InputView::new(&check, &redact, &verify_jwt).write_json(&mut written);
                prop_assert!(!owned.is_empty());
                prop_assert_eq!(&view, &owned);
                prop_assert_eq!(String::from_utf8_lossy(&written), owned);
                let owned = serde_json::to_string(&DecisionRecord::from(&decision)).unwrap_or_default();
                let view = serde_json::to_string(&DecisionView(&decision)).unwrap_or_default();
                let mut written = Vec::new();
                DecisionView(&decision).write_json(&mut written);
                prop_assert!(!owned.is_empty());
                prop_assert_eq!(&view, &owned);
                prop_assert_eq!(String::from_utf8_lossy(&written), owned);
            }
        }
    }

    #[test]
    fn a_record_line_from_an_older_version_still_reads() {
        let line = r#"{"ts":1,"request_id":"x","method":"GET","host":"h","path":"/","policy":null,"outcome":"deny","status":403,"reason":"no_route","extra":1}"#;
        let record: Record = serde_json::from_str(line).unwrap_or_else(|_| Record {
            v: Some(99),
            request_id: String::new(),
            policy: None,
            policy_digest: None,
            data_digest: None,
            prepared: false,
            policy_source: None,
            route: None,
            method: String::new(),
            host: String::new(),
            path: String::new(),
            outcome: String::new(),
            status: 0,
            reason: String::new(),
            fault: None,
            input: None,
            decision: None,
            shadow_disagreement: None,
            credential: None,
            subject: None,
        });
        assert_eq!((record.v, record.reason.as_str(), record.input.is_none()), (None, "no_route", true));
    }
}
