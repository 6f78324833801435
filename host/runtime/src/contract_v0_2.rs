//! Contract 0.2.0 on the host: the `request` interface answered from the check's
//! [`CheckRequest`], the `host` interface by the same code as 0.1.0's, and the conversions
//! between the two versions' types (the host keeps 0.1.0's: see [`crate::bindings`]).
//!
//! A getter copies only what it is asked for into the policy's memory: a policy that reads the
//! method, the path and the credential never pays for the headers, the body or the claims it
//! does not read. That is the point of this version (`docs/BENCHMARKS.md`).

use crate::bindings::sandgate::policy::types as v1;
use crate::bindings::v0_2::sandgate::policy::{host, request, types as v2};
use crate::host_state::HostState;

impl v2::Host for HostState {}

impl request::Host for HostState {
    fn request_id(&mut self) -> String {
        self.request.request_id.clone()
    }

    fn method(&mut self) -> String {
        self.request.method.clone()
    }

    fn scheme(&mut self) -> String {
        self.request.scheme.clone()
    }

    fn host(&mut self) -> String {
        self.request.host.clone()
    }

    fn path(&mut self) -> String {
        self.request.path.clone()
    }

    fn query(&mut self) -> Option<String> {
        self.request.query.clone()
    }

    fn header(&mut self, name: String) -> Option<String> {
        // Names are stored lowercase; `name` may be given in any case.
        self.request.headers.iter().find(|h| h.name.eq_ignore_ascii_case(&name)).map(|h| h.value.clone())
    }

    fn headers(&mut self) -> Vec<v2::Header> {
        self.request.headers.iter().map(|h| v2::Header { name: h.name.clone(), value: h.value.clone() }).collect()
    }

    fn peer(&mut self) -> Option<String> {
        self.request.peer.clone()
    }

    fn body(&mut self) -> Option<Vec<u8>> {
        self.request.body.clone()
    }

    fn credential(&mut self) -> v2::Credential {
        match &self.request.credential {
            v1::Credential::None => v2::Credential::None,
            v1::Credential::Verified(c) => v2::Credential::Verified(verified_credential(c.clone())),
            v1::Credential::Rejected(e) => v2::Credential::Rejected(credential_error(e.clone())),
        }
    }

    fn principal(&mut self) -> Option<v2::Principal> {
        match &self.request.credential {
            v1::Credential::Verified(c) => Some(v2::Principal {
                subject: c.claims.subject.clone(),
                roles: c.claims.roles.clone(),
                scopes: c.claims.scopes.clone(),
            }),
            v1::Credential::None | v1::Credential::Rejected(_) => None,
        }
    }

    fn claim(&mut self, name: String) -> Option<String> {
        match &self.request.credential {
            v1::Credential::Verified(c) => sandgate_spec::claim(&c.claims_json, &name).map(|v| v.to_string()),
            v1::Credential::None | v1::Credential::Rejected(_) => None,
        }
    }

    fn context(&mut self) -> v2::CheckContext {
        let v = &self.request.versions;
        v2::CheckContext {
            now: self.request.now,
            versions: v2::SnapshotVersions {
                snapshot: v.snapshot,
                policy_digest: v.policy_digest.clone(),
                key_set: v.key_set,
                revocations: v.revocations,
                data: v.data,
            },
        }
    }
}

impl host::Host for HostState {
    fn log(&mut self, level: host::LogLevel, message: String) {
        let level = match level {
            host::LogLevel::Debug => "debug",
            host::LogLevel::Info => "info",
            host::LogLevel::Warn => "warn",
            host::LogLevel::Error => "error",
        };
        self.push_log(level, message);
    }

    fn data_get(&mut self, pointer: String) -> Option<String> {
        self.data_at(&pointer)
    }

    fn verify_jwt(&mut self, token: String) -> Result<v2::VerifiedCredential, v2::CredentialError> {
        self.verify(&token).map(verified_credential).map_err(credential_error)
    }
}

fn verified_credential(c: v1::VerifiedCredential) -> v2::VerifiedCredential {
    let s = c.claims;
    v2::VerifiedCredential {
        key_id: c.key_id,
        algorithm: c.algorithm,
        claims: v2::StandardClaims {
            issuer: s.issuer,
            subject: s.subject,
            audiences: s.audiences,
            expires_at: s.expires_at,
            issued_at: s.issued_at,
            token_id: s.token_id,
            scopes: s.scopes,
            roles: s.roles,
        },
        claims_json: c.claims_json,
    }
}

fn credential_error(e: v1::CredentialError) -> v2::CredentialError {
    v2::CredentialError { reason: e.reason, message: e.message }
}

fn header(h: v2::Header) -> v1::Header {
    v1::Header { name: h.name, value: h.value }
}

/// A 0.2.0 decision as the host's, to be validated like any other.
pub(crate) fn decision(decision: v2::Decision) -> v1::Decision {
    match decision {
        v2::Decision::Allow(a) => v1::Decision::Allow(v1::AllowResponse {
            set_headers: a.set_headers.into_iter().map(header).collect(),
            remove_headers: a.remove_headers,
        }),
        v2::Decision::Deny(d) => v1::Decision::Deny(v1::DenyResponse {
            status: d.status,
            reason: d.reason,
            message: d.message,
            headers: d.headers.into_iter().map(header).collect(),
        }),
    }
}
