//! The decision record, version 2: one JSON object a line. `docs/decision-record.schema.json`
//! is its schema; this module is the reference. Version 1 lines still read (replay decides
//! them as before).
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
///
/// Version 2 writes nothing twice. Its `input` leaves out the pinned time and versions, which
/// are the record's own `ts`, `snapshot`, `policy_digest`, `key_set`, `revocations` and `data`;
/// and a verified credential (in `input.credential` and in `verify_jwt` answers) leaves out the
/// standard claims, which are what its `claims_json` gives ([`standard_claims`]), as the host
/// derived them for the policy. Version 1 wrote both; replay reads both versions.
pub const FORMAT_VERSION: u32 = 2;

/// The oldest record format version replay reads (lines older still carry no `v`).
pub const OLDEST_VERSION: u32 = 1;

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
    /// The pinned time, Unix seconds. Version 1 wrote it; version 2 leaves it out: it is the
    /// record's `ts` ([`Record::now`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub now: Option<u64>,
    /// The pinned versions, as the policy received them. Version 1 wrote them; version 2
    /// leaves them out: they are the record's own ([`Record::versions`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub versions: Option<Versions>,
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
///
/// Version 2 writes the key, the algorithm and `claims_json`; the standard claims are what
/// `claims_json` gives ([`standard_claims`]). Version 1 also wrote them, as the fields from
/// `issuer` to `roles` (`issuer`, `subject`, `audiences`, `scopes` and `roles` always).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifiedRecord {
    /// The `kid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// The algorithm.
    pub algorithm: String,
    /// `iss` (version 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// `sub` (version 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// `aud` (version 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audiences: Option<Vec<String>>,
    /// `exp` (version 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// `iat` (version 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<u64>,
    /// `jti` (version 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    /// Scopes (version 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    /// Roles (version 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roles: Option<Vec<String>>,
    /// Every claim, as the JSON text the policy received.
    pub claims_json: String,
}

/// The standard claims a policy receives with a credential whose claims are `claims_json`:
/// what the host derives from a verified token's claims
/// ([`sandgate_runtime::spec::standard_claims`]), so what a version 2 record leaves out. An
/// error if `claims_json` is not a JSON object.
pub fn standard_claims(claims_json: &str) -> Result<StandardClaims, String> {
    let claims: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(claims_json).map_err(|e| format!("claims_json is not a JSON object: {e}"))?;
    Ok(sandgate_runtime::spec::standard_claims(&claims))
}

impl From<&SnapshotVersions> for Versions {
    fn from(v: &SnapshotVersions) -> Self {
        Versions {
            snapshot: v.snapshot,
            policy_digest: v.policy_digest.clone(),
            key_set: v.key_set,
            revocations: v.revocations,
            data: v.data,
        }
    }
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
    /// When the check was decided, Unix seconds: its pinned time.
    #[serde(default)]
    pub ts: Option<u64>,
    /// Sandgate's id of the check.
    #[serde(default)]
    pub request_id: String,
    /// The snapshot the check was decided on.
    #[serde(default)]
    pub snapshot: Option<u64>,
    /// The key sets' version in it.
    #[serde(default)]
    pub key_set: Option<u64>,
    /// The revocations' version in it.
    #[serde(default)]
    pub revocations: Option<u64>,
    /// The policy's data document's version, when a policy ran.
    #[serde(default)]
    pub data: Option<u64>,
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
    /// The decision's status: 200 for an allow, else the deny's. Forward-auth answers a 5xx
    /// deny 403 (429 for `overloaded`): proxies must not read a deny as the sidecar being down.
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

impl Record {
    /// The pinned time of the check its `input` describes: the input's own (version 1) or the
    /// record's `ts` (version 2).
    pub fn now(&self) -> Option<u64> {
        self.input.as_ref().and_then(|input| input.now).or(self.ts)
    }

    /// The pinned versions of the check its `input` describes: the input's own (version 1) or
    /// the record's (version 2); `None` if neither is whole.
    pub fn versions(&self) -> Option<Versions> {
        if let Some(versions) = self.input.as_ref().and_then(|input| input.versions.clone()) {
            return Some(versions);
        }
        Some(Versions {
            snapshot: self.snapshot?,
            policy_digest: self.policy_digest.clone()?,
            key_set: self.key_set?,
            revocations: self.revocations?,
            data: self.data?,
        })
    }
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
            // The record's `ts` and versions (version 2).
            now: None,
            versions: None,
            verify_jwt,
        }
    }

    /// The check request this input describes, with `request_id`, pinned to `now` and
    /// `versions` (the record's: [`Record::now`], [`Record::versions`]); an error if the body
    /// is not base64 or a credential's claims are not a JSON object.
    pub fn to_check(&self, request_id: &str, now: u64, versions: &Versions) -> Result<CheckRequest, String> {
        use base64::Engine;
        let body = match &self.body {
            Some(b) => Some(
                base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|e| format!("the body is not base64: {e}"))?,
            ),
            None => None,
        };
        Ok(CheckRequest {
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
                CredentialRecord::Verified(v) => Credential::Verified(v.to_credential()?),
                CredentialRecord::Rejected(e) => Credential::Rejected(e.to_error()),
            },
            now,
            versions: SnapshotVersions {
                snapshot: versions.snapshot,
                policy_digest: versions.policy_digest.clone(),
                key_set: versions.key_set,
                revocations: versions.revocations,
                data: versions.data,
            },
        })
    }
}

impl From<&VerifiedCredential> for VerifiedRecord {
    /// As version 2 writes it: the standard claims are those of `claims_json`, as the host
    /// derives them.
    fn from(v: &VerifiedCredential) -> Self {
        VerifiedRecord {
            key_id: v.key_id.clone(),
            algorithm: v.algorithm.clone(),
            issuer: None,
            subject: None,
            audiences: None,
            expires_at: None,
            issued_at: None,
            token_id: None,
            scopes: None,
            roles: None,
            claims_json: v.claims_json.clone(),
        }
    }
}

impl VerifiedRecord {
    /// The standard claims: as written (version 1, which always writes `issuer`), or what
    /// `claims_json` gives (version 2). An error for claims written in part, or `claims_json`
    /// that is not a JSON object when they are to come from it.
    pub fn claims(&self) -> Result<StandardClaims, String> {
        let Some(issuer) = &self.issuer else {
            let written = self.subject.is_some()
                || self.audiences.is_some()
                || self.expires_at.is_some()
                || self.issued_at.is_some()
                || self.token_id.is_some()
                || self.scopes.is_some()
                || self.roles.is_some();
            if written {
                return Err("a credential's standard claims are written without its issuer".into());
            }
            return standard_claims(&self.claims_json);
        };
        let missing = |field: &str| format!("a credential's standard claims are written without its {field}");
        Ok(StandardClaims {
            issuer: issuer.clone(),
            subject: self.subject.clone().ok_or_else(|| missing("subject"))?,
            audiences: self.audiences.clone().ok_or_else(|| missing("audiences"))?,
            expires_at: self.expires_at,
            issued_at: self.issued_at,
            token_id: self.token_id.clone(),
            scopes: self.scopes.clone().ok_or_else(|| missing("scopes"))?,
            roles: self.roles.clone().ok_or_else(|| missing("roles"))?,
        })
    }

    /// As the WIT `verified-credential`; an error as [`VerifiedRecord::claims`] says.
    pub fn to_credential(&self) -> Result<VerifiedCredential, String> {
        Ok(VerifiedCredential {
            key_id: self.key_id.clone(),
            algorithm: self.algorithm.clone(),
            claims: self.claims()?,
            claims_json: self.claims_json.clone(),
        })
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
        let mut s = serializer.serialize_struct("Input", 10)?;
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
        // The pinned time and versions are the record's (version 2).
        s.skip_field("now")?;
        s.skip_field("versions")?;
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
                k.some_str("key_id", v.key_id.as_deref());
                k.str("algorithm", &v.algorithm);
                k.str("claims_json", &v.claims_json);
            }
            Credential::Rejected(e) => {
                k.str("kind", "rejected");
                k.str("reason", &e.reason);
                k.str("message", &e.message);
            }
        }
        k.end();
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
                let mut s = serializer.serialize_struct("CredentialRecord", 4)?;
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

/// The fields of a [`VerifiedRecord`] version 2 writes, in its order, from the WIT credential:
/// the standard claims are left to `claims_json`.
fn verified_fields<S: serde::ser::SerializeStruct>(s: &mut S, v: &VerifiedCredential) -> Result<(), S::Error> {
    match &v.key_id {
        Some(key_id) => s.serialize_field("key_id", key_id)?,
        None => s.skip_field("key_id")?,
    }
    s.serialize_field("algorithm", &v.algorithm)?;
    s.serialize_field("claims_json", &v.claims_json)
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
                claims_json:
                    r#"{"aud":"api","exp":10,"iss":"https://issuer","jti":"j","roles":["reader"],"sub":"alice"}"#.into(),
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
        let replayed = back.to_check("r-1", check.now, &Versions::from(&check.versions)).ok();
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
                    if a.claims_json == b.claims_json && a.claims == b.claims && a.key_id == b.key_id)
        });
        assert!(same);
    }

    /// A version 2 line of `check`'s input, and the version 1 line the same check had.
    fn lines_of_both_versions(check: &CheckRequest) -> (String, String) {
        let top = format!(
            r#""ts":{},"request_id":"r-1","method":"GET","host":"api.example","path":"/orders/7","policy":"p","policy_digest":"ab","snapshot":3,"key_set":2,"revocations":1,"data":4,"credential":"verified","subject":"alice","outcome":"allow","status":200,"reason":"allow""#,
            check.now
        );
        let decision = r#""decision":{"decision":"allow","set_headers":[],"remove_headers":[]}"#;
        let input = serde_json::to_string(&InputView::new(check, &[], &[])).unwrap_or_default();
        let v2 = format!(r#"{{"v":2,{top},"input":{input},{decision}}}"#);
        // Version 1 wrote the pinned time, the versions and the standard claims in the input.
        let mut v1_input = Input::capture(check, &[], Vec::new());
        v1_input.now = Some(check.now);
        v1_input.versions = Some(Versions::from(&check.versions));
        if let (CredentialRecord::Verified(v), Credential::Verified(c)) = (&mut v1_input.credential, &check.credential)
        {
            let claims = &c.claims;
            v.issuer = Some(claims.issuer.clone());
            v.subject = Some(claims.subject.clone());
            v.audiences = Some(claims.audiences.clone());
            (v.expires_at, v.issued_at, v.token_id) = (claims.expires_at, claims.issued_at, claims.token_id.clone());
            v.scopes = Some(claims.scopes.clone());
            v.roles = Some(claims.roles.clone());
        }
        let v1_input = serde_json::to_string(&v1_input).unwrap_or_default();
        let v1 = format!(r#"{{"v":1,{top},"input":{v1_input},{decision}}}"#);
        (v2, v1)
    }

    #[test]
    fn a_version_2_line_writes_nothing_twice_and_reads_as_the_check_its_version_1_line_did() {
        let check = check();
        let (v2, v1) = lines_of_both_versions(&check);
        // Version 2: no pinned time, versions or standard claims in the input.
        for field in [r#""now""#, r#""versions""#, r#""issuer""#, r#""roles""#, r#""expires_at""#] {
            assert!(!v2.contains(field), "{field} in {v2}");
            assert!(v1.contains(field), "{field} not in {v1}");
        }
        assert!(v2.len() < v1.len());
        let read = |line: &str| -> CheckRequest {
            let record: Record = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            let input = record.input.as_ref().expect("an input");
            let (now, versions) = (record.now().expect("now"), record.versions().expect("versions"));
            input.to_check("r-1", now, &versions).unwrap_or_else(|e| panic!("{e}: {line}"))
        };
        let (from_v2, from_v1) = (read(&v2), read(&v1));
        let redacted = |c: &CheckRequest| Input::capture(c, &[], Vec::new());
        assert_eq!(redacted(&from_v2), redacted(&check));
        assert_eq!((from_v2.now, &from_v2.versions.policy_digest), (check.now, &check.versions.policy_digest));
        assert_eq!(from_v2.versions.data, check.versions.data);
        let claims = |c: &CheckRequest| match &c.credential {
            Credential::Verified(v) => Some(v.claims.clone()),
            _ => None,
        };
        assert_eq!(claims(&from_v2), claims(&check));
        assert_eq!(claims(&from_v1), claims(&check));
        assert_eq!((from_v1.now, from_v1.versions.snapshot), (check.now, check.versions.snapshot));
    }

    #[test]
    fn standard_claims_written_in_part_or_claims_that_are_not_an_object_do_not_read() {
        let record = |fields: &str| -> VerifiedRecord {
            serde_json::from_str(&format!(r#"{{"algorithm":"HS256",{fields}"claims_json":"{{\"sub\":\"a\"}}"}}"#))
                .unwrap_or_else(|e| panic!("{e}: {fields}"))
        };
        assert_eq!(record("").claims().map(|c| c.subject), Ok("a".to_owned()));
        assert!(record(r#""roles":["x"],"#).claims().unwrap_err().contains("without its issuer"));
        assert!(
            record(r#""issuer":"i","subject":"s","audiences":[],"scopes":[],"#).claims().unwrap_err().contains("roles")
        );
        let v1 = record(r#""issuer":"i","subject":"s","audiences":[],"scopes":[],"roles":[],"#).claims();
        assert_eq!(v1.map(|c| (c.issuer, c.subject)), Ok(("i".to_owned(), "s".to_owned())));
        let not_an_object = VerifiedRecord { claims_json: "[1]".into(), ..record("") };
        assert!(not_an_object.claims().unwrap_err().contains("not a JSON object"));
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

        /// Any JSON value a claim may hold, numbers of every kind among them.
        fn claim() -> impl Strategy<Value = serde_json::Value> {
            use serde_json::{Value, json};
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<u64>().prop_map(|n| json!(n)),
                any::<i64>().prop_map(|n| json!(n)),
                any::<f64>().prop_map(|f| json!(f)),
                text().prop_map(Value::String),
                "[a-z]{1,5}( [a-z]{1,5}){0,3}".prop_map(Value::String),
            ];
            leaf.prop_recursive(2, 8, 3, |inner| {
                prop_oneof![
                    vec(inner.clone(), 0..3).prop_map(serde_json::Value::Array),
                    proptest::collection::btree_map("[a-z]{1,3}", inner, 0..3)
                        .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// A credential as the host makes one: its standard claims derived from its claims,
        /// `claims_json` their text (`sandgate_auth::VerifiedToken::new`).
        fn verified() -> impl Strategy<Value = VerifiedCredential> {
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
            let claims = proptest::collection::btree_map(name.prop_map(str::to_owned), claim(), 0..8);
            (option::of(text()), text(), claims).prop_map(|(key_id, algorithm, claims)| {
                sandgate_runtime::spec::verified_credential(claims.into_iter().collect(), key_id, &algorithm)
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
                prop_assert_eq!(String::from_utf8_lossy(&written), owned.clone());
                // Read back, the input is the check the policy saw: its pinned time and
                // versions the record's, its credentials' standard claims what their claims give.
                let read: Input = serde_json::from_str(&owned).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let versions = Versions::from(&check.versions);
                let back = read.to_check(&check.request_id, check.now, &versions).map_err(TestCaseError::fail)?;
                prop_assert_eq!(&back.credential, &check.credential);
                prop_assert_eq!((back.now, &back.versions), (check.now, &check.versions));
                for (answer, recorded) in verify_jwt.iter().zip(&read.verify_jwt) {
                    prop_assert_eq!(answer, recorded);
                }
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
            ts: None,
            request_id: String::new(),
            snapshot: None,
            key_set: None,
            revocations: None,
            data: None,
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
