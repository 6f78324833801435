//! A policy built against contract 0.1.0 (`wit/0.1.0/policy.wit`), which passes the whole
//! request to `check` as one record: the host keeps serving policies built before 0.2.0. It
//! denies a request without a verified credential and allows the rest, echoing what it was
//! given as upstream headers, so a test can hold it to the request the host built.

#![allow(missing_docs, reason = "the bindings wit_bindgen generates carry no docs")]

wit_bindgen::generate!({
    path: "../../wit/0.1.0",
    world: "authorizer",
    generate_all,
});

use exports::sandgate::policy::policy::Guest;
use sandgate::policy::host::data_get;
use sandgate::policy::types::{AllowResponse, CheckRequest, Credential, Decision, DenyResponse, Header};

struct Echo;

fn header(name: &str, value: &str) -> Header {
    Header { name: name.into(), value: value.into() }
}

impl Guest for Echo {
    fn check(request: CheckRequest) -> Decision {
        let Credential::Verified(credential) = &request.credential else {
            return Decision::Deny(DenyResponse {
                status: 401,
                reason: "missing_credential".into(),
                message: "a bearer token is required".into(),
                headers: Vec::new(),
            });
        };
        let user_agent = request.headers.iter().find(|h| h.name == "user-agent").map_or("", |h| h.value.as_str());
        let set_headers = vec![
            header("x-method", &request.method),
            header("x-path", &request.path),
            header("x-subject", &credential.claims.subject),
            header("x-roles", &credential.claims.roles.join(",")),
            header("x-user-agent", user_agent),
            header("x-now", &request.now.to_string()),
            header("x-data", &data_get("/name").unwrap_or_default()),
        ];
        Decision::Allow(AllowResponse { set_headers, remove_headers: Vec::new() })
    }
}

export!(Echo);
