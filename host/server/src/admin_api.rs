//! The admin HTTP API: changing what the sidecar serves while it serves, through [`State`].
//!
//! The API (JSON; modules as raw bytes) listens on its own loopback address with a
//! bearer token, or on a Unix socket:
//!
//! | call | does |
//! |---|---|
//! | `GET /v1/snapshot` | versions, policies with digests, contract versions and load times |
//! | `PUT /v1/policies/{id}` (body: `.wasm`, or `{"module": "oci://…"}`) | load or replace a policy module; a tag is resolved at the registry now and pinned |
//! | `DELETE /v1/policies/{id}` | unload a policy no route uses |
//! | `PUT /v1/policies/{id}/data` (body: JSON) | replace its data document |
//! | `PUT /v1/policies/{id}/shadow` (body: `.wasm`, or `{"module": "oci://…"}`) | attach a candidate to shadow-evaluate |
//! | `DELETE /v1/policies/{id}/shadow` | detach it |
//! | `POST /v1/revocations`, `DELETE /v1/revocations` (`{"jtis": [], "subjects": []}`) | revoke, un-revoke |
//! | `PUT /v1/keys` (`{"issuer": "…", "jwks": {"keys": […]}}`) | replace an issuer's static keys |
//! | `POST /v1/jwks/refresh` (`{"issuer": "…"}`) | fetch an issuer's JWKS now |
//! | `POST /v1/keys/blocked`, `DELETE /v1/keys/blocked` (`{"issuer": "…", "kid": "…"}`) | refuse tokens naming a key, or stop refusing them |
//!
//! Answers: `200` with `{"snapshot": N, …}`; `400`/`422` with `{"error": "…"}` for bad input
//! (the old state keeps serving); `401` without the token; `404`/`409` as usual; `502` when a
//! JWKS endpoint or a registry fails (unreachable, refused credentials, a blob that does not
//! match its digest), `404` for an unknown tag, `422` for an artifact that is not a module or
//! lacks a required signature; `500` (logged, the body says nothing more) when the host itself fails.
//! [`AdminApi::handle`] takes any request body type, so tests call it without a socket.

use crate::listener::BodyRefused;
use crate::original_request::{Bearer, bearer_token};
use crate::snapshot::Snapshot;
use crate::state::{ChangeError, RevocationChange, State};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body;
use hyper::{Method, Request, Response, StatusCode};
use sandgate_registry::RegistryError;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Largest module or document the admin API accepts.
pub(crate) const MAX_BODY: usize = 32 << 20;

/// The live snapshot as JSON.
pub fn snapshot_json(s: &Snapshot) -> Value {
    let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut policies: Vec<Value> = s
        .policies
        .values()
        .map(|p| {
            json!({
                "id": p.id,
                "digest": p.module.digest(),
                "size": p.module.size(),
                "contract": p.module.contract().version(),
                "loaded_at": unix(p.loaded_at),
                "data_version": p.data.version,
                "shadow_digest": p.shadow.as_ref().map(|m| m.digest()),
                "source": p.source.as_ref().map(|s| &s.pinned),
                "requested": p.source.as_ref().map(|s| &s.requested),
            })
        })
        .collect();
    policies.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    json!({
        "snapshot": s.version,
        "fleet_revision": s.fleet_revision,
        "key_set": s.keys.version,
        "revocations": s.revocations.version,
        "policies": policies,
        "issuers": s.keys.issuers.values().map(|i| json!({
            "issuer": i.issuer,
            "kids": i.keys.iter().map(|k| k.kid.clone()).collect::<Vec<_>>(),
            "blocked_kids": i.blocked_kids,
            "fetched_at": i.fetched_at,
        })).collect::<Vec<_>>(),
    })
}

/// The admin API's request handler.
pub struct AdminApi {
    state: Arc<State>,
    token: Option<String>,
}

impl AdminApi {
    /// An API for `state`; `token` is required on every call when set.
    pub fn new(state: Arc<State>, token: Option<String>) -> Self {
        AdminApi { state, token }
    }

    /// Answer one admin request.
    pub async fn handle<B>(&self, request: Request<B>) -> Response<Full<Bytes>>
    where
        B: Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if let Some(token) = &self.token {
            let presented =
                request.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(bearer_token);
            let Some(Bearer::Token(presented)) = presented else { return unauthorized() };
            if !constant_time_eq(presented.as_bytes(), token.as_bytes()) {
                return unauthorized();
            }
        }
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) => {
                let status = match e.downcast_ref::<BodyRefused>() {
                    Some(BodyRefused::Late) => StatusCode::REQUEST_TIMEOUT,
                    Some(BodyRefused::Budget) => StatusCode::SERVICE_UNAVAILABLE,
                    None => StatusCode::PAYLOAD_TOO_LARGE,
                };
                return reply(
                    status,
                    json!({ "error": format!("cannot read the body (at most {MAX_BODY} bytes): {e}") }),
                );
            }
        };
        let fleet_owned = matches!(
            (&method, segments.as_slice()),
            (&Method::PUT | &Method::DELETE, ["v1", "policies", _])
                | (&Method::PUT, ["v1", "policies", _, "data"])
                | (&Method::PUT | &Method::DELETE, ["v1", "policies", _, "shadow"])
                | (&Method::POST | &Method::DELETE, ["v1", "revocations"])
                | (&Method::PUT, ["v1", "keys"])
        );
        if fleet_owned && let Some(fleet) = &self.state.fleet {
            let error = ChangeError::Conflict(format!(
                "policies, data, shadows, revocations and keys are owned by the fleet `{}`: change them with `sandgate fleet`",
                fleet.name
            ));
            return error_response(&method, &path, &error);
        }
        let result = match (&method, segments.as_slice()) {
            (&Method::GET, ["v1", "snapshot"]) => Ok(self.state.store.load()),
            (&Method::PUT, ["v1", "policies", id]) => match module_body(body) {
                Ok(ModuleBody::Bytes(bytes)) => self.state.put_policy(id, bytes).await,
                Ok(ModuleBody::Oci(reference)) => self.state.put_policy_from(id, &reference).await,
                Err(e) => Err(e),
            },
            (&Method::DELETE, ["v1", "policies", id]) => self.state.remove_policy(id, false),
            (&Method::PUT, ["v1", "policies", id, "data"]) => match serde_json::from_slice(&body) {
                Ok(value) => self.state.put_data(id, value),
                Err(e) => Err(ChangeError::BadInput(format!("the data document is not JSON: {e}"))),
            },
            (&Method::PUT, ["v1", "policies", id, "shadow"]) => match module_body(body) {
                Ok(ModuleBody::Bytes(bytes)) => self.state.set_shadow(id, Some(bytes)).await,
                Ok(ModuleBody::Oci(reference)) => self.state.set_shadow_from(id, &reference).await,
                Err(e) => Err(e),
            },
            (&Method::DELETE, ["v1", "policies", id, "shadow"]) => self.state.set_shadow(id, None).await,
            (&Method::POST | &Method::DELETE, ["v1", "revocations"]) => {
                match serde_json::from_slice::<RevocationChange>(&body) {
                    Ok(change) => Ok(self.state.change_revocations(&change, method == Method::POST)),
                    Err(e) => {
                        Err(ChangeError::BadInput(format!("expected {{\"jtis\": [..], \"subjects\": [..]}}: {e}")))
                    }
                }
            }
            (&Method::PUT, ["v1", "keys"]) => match serde_json::from_slice::<KeysBody>(&body) {
                Ok(keys) => self.state.rotate_keys(&keys.issuer, &keys.jwks),
                Err(e) => Err(ChangeError::BadInput(format!(
                    "expected {{\"issuer\": \"..\", \"jwks\": {{\"keys\": [..]}}}}: {e}"
                ))),
            },
            (&Method::POST | &Method::DELETE, ["v1", "keys", "blocked"]) => {
                match serde_json::from_slice::<KidBody>(&body) {
                    Ok(b) => self.state.block_kid(&b.issuer, &b.kid, method == Method::POST),
                    Err(e) => {
                        Err(ChangeError::BadInput(format!("expected {{\"issuer\": \"..\", \"kid\": \"..\"}}: {e}")))
                    }
                }
            }
            (&Method::POST, ["v1", "jwks", "refresh"]) => match serde_json::from_slice::<IssuerBody>(&body) {
                Ok(b) => self.state.refresh_jwks(&b.issuer).await,
                Err(e) => Err(ChangeError::BadInput(format!("expected {{\"issuer\": \"..\"}}: {e}"))),
            },
            _ => return reply(StatusCode::NOT_FOUND, json!({ "error": format!("no admin call {method} {path}") })),
        };
        match result {
            Ok(snapshot) => reply(StatusCode::OK, snapshot_json(&snapshot)),
            Err(error) => error_response(&method, &path, &error),
        }
    }
}

enum ModuleBody {
    Bytes(Bytes),
    Oci(sandgate_registry::ModuleRef),
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ModuleRefBody {
    module: String,
}

/// A module upload: `{"module": "oci://…"}` (a JSON object), or else the module itself (which
/// the runtime then validates, saying what is wrong with it).
fn module_body(body: Bytes) -> Result<ModuleBody, ChangeError> {
    if !body.trim_ascii_start().starts_with(b"{") {
        return Ok(ModuleBody::Bytes(body));
    }
    let expected = "expected {\"module\": \"oci://HOST/REPO:TAG\"} (or `@sha256:…`), or a Wasm component";
    let named: ModuleRefBody =
        serde_json::from_slice(&body).map_err(|e| ChangeError::BadInput(format!("{expected}: {e}")))?;
    if !sandgate_registry::ModuleRef::is_oci(&named.module) {
        return Err(ChangeError::BadInput(format!("{expected}; the admin API does not read files")));
    }
    named.module.parse().map(ModuleBody::Oci).map_err(|e| ChangeError::BadInput(e.to_string()))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysBody {
    issuer: String,
    jwks: jsonwebtoken::jwk::JwkSet,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KidBody {
    issuer: String,
    kid: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct IssuerBody {
    issuer: String,
}

fn unauthorized() -> Response<Full<Bytes>> {
    let mut response = reply(StatusCode::UNAUTHORIZED, json!({ "error": "a valid admin bearer token is required" }));
    response.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, hyper::header::HeaderValue::from_static("Bearer"));
    response
}

/// The one mapping of a refused change to its answer. The caller's mistakes get their
/// message; the host's own failures are logged with their causes and answered opaquely.
fn error_response(method: &Method, path: &str, error: &ChangeError) -> Response<Full<Bytes>> {
    let status = match error {
        ChangeError::Module(_) | ChangeError::Probe(_) | ChangeError::DigestNotAllowed(_) | ChangeError::Keys(_) => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        ChangeError::BadId(_) | ChangeError::BadInput(_) => StatusCode::BAD_REQUEST,
        ChangeError::NotFound(_) => StatusCode::NOT_FOUND,
        ChangeError::Conflict(_) => StatusCode::CONFLICT,
        ChangeError::Fetch(_) => StatusCode::BAD_GATEWAY,
        ChangeError::Pull(e) => match e {
            RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
            RegistryError::NotWasm { .. } | RegistryError::TooLarge { .. } | RegistryError::Unsigned { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            RegistryError::NotCached(_) | RegistryError::NoTag(_) | RegistryError::NotAllowed(_) => {
                StatusCode::CONFLICT
            }
            RegistryError::Setup(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_GATEWAY,
        },
        ChangeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let chain = sandgate_auth::error_chain(error);
    if status.is_server_error() {
        tracing::error!(%method, path, error = %chain, "admin call failed");
    } else {
        tracing::warn!(%method, path, error = %chain, "admin change refused");
    }
    let message = match error {
        ChangeError::Internal(_) => "internal error; see the sidecar's log".to_owned(),
        _ => chain,
    };
    reply(status, json!({ "error": message }))
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string() + "\n")));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    response
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_module_body_is_wasm_or_an_oci_reference_never_a_path() {
        assert!(matches!(module_body(Bytes::from_static(b"\0asm\x0d\0\x01\0")), Ok(ModuleBody::Bytes(_))));
        // Anything else that is not a JSON object goes to the runtime, which says what it is not.
        assert!(matches!(module_body(Bytes::from_static(b"#!/bin/sh")), Ok(ModuleBody::Bytes(_))));
        let oci = module_body(Bytes::from_static(br#"{"module": "oci://localhost:5000/p@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}"#));
        assert!(matches!(oci, Ok(ModuleBody::Oci(r)) if r.digest().is_some()));
        for (body, why) in [
            (&br#"{"module": "/etc/passwd"}"#[..], "does not read files"),
            (br#"{"module": "oci://localhost:5000/p"}"#, "no tag or digest"),
            (br#"{"module": "oci://localhost:5000/p:v1", "extra": 1}"#, "unknown field"),
            (b" {not json", "expected {\"module\""),
        ] {
            let Err(ChangeError::BadInput(message)) = module_body(Bytes::copy_from_slice(body)) else {
                panic!("accepted {body:?}")
            };
            assert!(message.contains(why), "{message}");
        }
    }
}
