//! Check requests from their JSON form ([`sandgate_spec::RequestSpec`]), and decisions back to
//! the forms fixtures and `sandgate eval` use. Shared by the CLI, the fixture runner, shadow
//! evaluation (which compares outcomes) and the tests.

use crate::Evaluation;
use crate::bindings::sandgate::policy::types::{
    CheckRequest, Credential, CredentialError, Decision, Header, SnapshotVersions, StandardClaims, VerifiedCredential,
};
use sandgate_spec::{Outcome, RequestSpec};
use serde_json::{Map, Value, json};

/// A verified credential carrying `claims`, with the standard claims typed.
pub fn verified_credential(claims: Map<String, Value>, key_id: Option<String>, algorithm: &str) -> VerifiedCredential {
    VerifiedCredential {
        key_id,
        algorithm: algorithm.to_owned(),
        claims: standard_claims(&claims),
        claims_json: Value::Object(claims).to_string(),
    }
}

/// The standard claims a policy receives with `claims` ([`sandgate_spec::StandardClaims`]), as
/// the WIT `standard-claims`.
pub fn standard_claims(claims: &Map<String, Value>) -> StandardClaims {
    wit_claims(sandgate_spec::StandardClaims::from_claims(claims))
}

/// Typed standard claims as the WIT `standard-claims`.
pub fn wit_claims(s: sandgate_spec::StandardClaims) -> StandardClaims {
    StandardClaims {
        issuer: s.issuer,
        subject: s.subject,
        audiences: s.audiences,
        expires_at: s.expires_at,
        issued_at: s.issued_at,
        token_id: s.token_id,
        scopes: s.scopes,
        roles: s.roles,
    }
}

/// The versions a check outside the sidecar (the CLI, a fixture run) reports: no snapshot, no
/// key sets, the module's digest, the first version of its data.
pub fn standalone_versions(policy_digest: &str) -> SnapshotVersions {
    SnapshotVersions { snapshot: 0, policy_digest: policy_digest.to_owned(), key_set: 0, revocations: 0, data: 1 }
}

/// Build a check request from its JSON form. `now` is used when the spec pins none.
pub fn from_spec(spec: &RequestSpec, now: u64, versions: SnapshotVersions) -> CheckRequest {
    let credential = match (&spec.claims, &spec.credential_error) {
        (Some(claims), _) => Credential::Verified(verified_credential(claims.clone(), None, "none")),
        (None, Some(e)) => Credential::Rejected(CredentialError {
            reason: e.reason.clone(),
            message: e.message.clone().unwrap_or_else(|| e.reason.clone()),
        }),
        (None, None) => Credential::None,
    };
    CheckRequest {
        request_id: "cli".into(),
        method: spec.method.to_ascii_uppercase(),
        scheme: spec.scheme.clone(),
        host: spec.host.clone(),
        path: spec.path.clone(),
        query: spec.query.clone(),
        headers: spec.header_pairs().into_iter().map(|(name, value)| Header { name, value }).collect(),
        peer: spec.peer.clone(),
        body: spec.body.as_ref().map(|b| b.as_bytes().to_vec()),
        credential,
        now: spec.now.unwrap_or(now),
        versions,
    }
}

/// Reduce a decision to what fixtures assert on.
pub fn outcome(decision: &Decision) -> Outcome {
    match decision {
        Decision::Allow(a) => {
            Outcome::Allow { headers: a.set_headers.iter().map(|h| (h.name.clone(), h.value.clone())).collect() }
        }
        Decision::Deny(d) => Outcome::Deny { status: d.status, reason: d.reason.clone(), message: d.message.clone() },
    }
}

fn headers_json(headers: &[Header]) -> Value {
    Value::Array(headers.iter().map(|h| json!({ "name": h.name, "value": h.value })).collect())
}

/// The evaluation as the JSON `sandgate eval` prints.
pub fn evaluation_json(evaluation: &Evaluation) -> Value {
    let mut out = match &evaluation.decision {
        Decision::Allow(a) => json!({
            "decision": "allow",
            "set_headers": headers_json(&a.set_headers),
            "remove_headers": a.remove_headers,
        }),
        Decision::Deny(d) => json!({
            "decision": "deny",
            "status": d.status,
            "reason": d.reason,
            "message": d.message,
            "headers": headers_json(&d.headers),
        }),
    };
    if let Some(fault) = &evaluation.fault {
        out["fault"] = json!(fault.to_string());
    }
    out["logs"] = json!(evaluation.logs);
    if evaluation.prepared {
        out["prepared"] = json!(true);
    }
    out
}
