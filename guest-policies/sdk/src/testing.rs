//! Native test support: a stand-in for the host, and a runner for fixture files.
//!
//! Under `cargo test` a policy is plain Rust; the host imports it calls ([`crate::host`]) are
//! served from a per-thread stand-in whose data document and tokens a test sets.
//!
//! ```ignore
//! #[test]
//! fn fixtures() {
//!     sandgate_policy_sdk::testing::run_fixtures::<MyPolicy>(include_str!("../fixtures.json"));
//! }
//! ```

use crate::{
    Credential, CredentialError, Decision, Header, LogLevel, Policy, Request, RequestParts, SnapshotVersions,
    StandardClaims, VerifiedCredential,
};
use sandgate_spec::{FixtureFile, Outcome, RequestSpec};
use serde_json::Value;
use std::cell::RefCell;
use std::collections::HashMap;

#[derive(Default)]
struct TestHost {
    data: Value,
    tokens: HashMap<String, VerifiedCredential>,
    logs: Vec<(LogLevel, String)>,
}

thread_local! {
    static HOST: RefCell<TestHost> = RefCell::new(TestHost::default());
}

/// Set the data document `host::data_get` reads on this thread.
pub fn set_data(data: Value) {
    HOST.with(|h| h.borrow_mut().data = data);
}

/// Make `host::verify_jwt(token)` succeed on this thread with these claims.
pub fn add_token(token: &str, claims: Value) {
    let credential = verified_credential(claims.as_object().cloned().unwrap_or_default());
    HOST.with(|h| h.borrow_mut().tokens.insert(token.to_owned(), credential));
}

/// Take the log lines policies wrote on this thread.
pub fn take_logs() -> Vec<(LogLevel, String)> {
    HOST.with(|h| std::mem::take(&mut h.borrow_mut().logs))
}

pub(crate) fn log(level: LogLevel, message: &str) {
    HOST.with(|h| h.borrow_mut().logs.push((level, message.to_owned())));
}

pub(crate) fn data_get(pointer: &str) -> Option<String> {
    HOST.with(|h| h.borrow().data.pointer(pointer).map(Value::to_string))
}

pub(crate) fn verify_jwt(token: &str) -> Result<VerifiedCredential, CredentialError> {
    HOST.with(|h| h.borrow().tokens.get(token).cloned()).ok_or_else(|| CredentialError {
        reason: "unknown_token".into(),
        message: "token not registered with testing::add_token".into(),
    })
}

/// A verified credential carrying `claims`, as the host would build it.
pub fn verified_credential(claims: serde_json::Map<String, Value>) -> VerifiedCredential {
    let s = sandgate_spec::StandardClaims::from_claims(&claims);
    VerifiedCredential {
        key_id: None,
        algorithm: "none".into(),
        claims: StandardClaims {
            issuer: s.issuer,
            subject: s.subject,
            audiences: s.audiences,
            expires_at: s.expires_at,
            issued_at: s.issued_at,
            token_id: s.token_id,
            scopes: s.scopes,
            roles: s.roles,
        },
        claims_json: Value::Object(claims).to_string(),
    }
}

/// Build a [`Request`] from its JSON form, pinned at `now`.
pub fn request_from_spec(spec: &RequestSpec, now: u64) -> Request {
    Request::from_parts(parts_from_spec(spec, now))
}

/// The parts of a [`Request`] from its JSON form, pinned at `now`, to adjust before building it.
pub fn parts_from_spec(spec: &RequestSpec, now: u64) -> RequestParts {
    let credential = match (&spec.claims, &spec.credential_error) {
        (Some(claims), _) => Credential::Verified(verified_credential(claims.clone())),
        (None, Some(e)) => Credential::Rejected(CredentialError {
            reason: e.reason.clone(),
            message: e.message.clone().unwrap_or_else(|| e.reason.clone()),
        }),
        (None, None) => Credential::None,
    };
    RequestParts {
        request_id: "test".into(),
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
        versions: SnapshotVersions { snapshot: 0, policy_digest: String::new(), key_set: 0, revocations: 0, data: 0 },
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

/// Run every case of a fixture file through `P` natively; panic with every failing case.
#[expect(clippy::panic, reason = "a test helper: failing the calling test is its job")]
pub fn run_fixtures<P: Policy>(fixtures_json: &str) {
    let file = match FixtureFile::parse(fixtures_json) {
        Ok(file) => file,
        Err(e) => panic!("fixture file is not valid: {e}"),
    };
    let mut failures = Vec::new();
    for case in &file.cases {
        set_data(case.data.clone().or_else(|| file.data.clone()).unwrap_or(Value::Null));
        let request = request_from_spec(&case.request, file.now.unwrap_or(0));
        let got = outcome(&P::check(&request));
        if let Err(why) = case.expect.check(&got) {
            failures.push(format!("case `{}`: {why}", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixture cases failed:\n{}",
        failures.len(),
        file.cases.len(),
        failures.join("\n")
    );
}
