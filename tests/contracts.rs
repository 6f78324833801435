//! The versions of the WIT contract the host serves: 0.2.0, where a policy reads its request
//! through the `request` interface, and 0.1.0, where the whole request is passed to `check`.
//! A policy of either version sees the same request.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test: a failed set-up should stop it loudly"
)]

use sandgate_runtime::Contract;
use sandgate_runtime::bindings::sandgate::policy::types::Decision;
use sandgate_tests::{check, context, load, runtime};
use serde_json::json;

fn allowed_headers(decision: &Decision) -> Vec<(String, String)> {
    match decision {
        Decision::Allow(a) => a.set_headers.iter().map(|h| (h.name.clone(), h.value.clone())).collect(),
        Decision::Deny(d) => panic!("denied: {} {}", d.reason, d.message),
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str()).unwrap_or_else(|| panic!("no {name}"))
}

#[test]
fn every_part_of_the_request_reads_back_through_the_request_interface() {
    let runtime = runtime();
    let hostile = load(&runtime, "hostile");
    assert_eq!(hostile.contract(), Contract::V0_2);
    let request = check(json!({
        "method": "post", "scheme": "http", "host": "shop.example", "path": "/echo", "query": "a=1&b",
        "headers": { "user-agent": "curl/8", "authorization": "Bearer t0ken", "x-many": ["1", "2"] },
        "peer": "10.0.0.7:5123", "body": "{\"qty\":2}", "now": 1_800_000_000_u64,
        "claims": { "iss": "https://issuer.example", "sub": "alice", "roles": ["reader", "writer"] }
    }));
    let evaluation = runtime.evaluate(&hostile, &request, &context(json!(null)));
    let headers = allowed_headers(&evaluation.decision);
    let expected = [
        ("x-request-id", "cli"),
        ("x-method", "POST"),
        ("x-scheme", "http"),
        ("x-host", "shop.example"),
        ("x-query", "a=1&b"),
        ("x-user-agent", "curl/8"),
        ("x-absent", "-"),
        ("x-headers", "authorization=Bearer t0ken;user-agent=curl/8;x-many=1;x-many=2"),
        ("x-peer", "10.0.0.7:5123"),
        ("x-body", "{\"qty\":2}"),
        ("x-subject", "alice reader,writer none"),
        ("x-bearer", "t0ken"),
        ("x-now", "1800000000"),
        ("x-versions", "1 1 "),
    ];
    for (name, value) in expected {
        assert_eq!(header(&headers, name), value, "{name}");
    }

    // Nothing optional given: the getters answer none, not an empty string.
    let bare = runtime.evaluate(&hostile, &check(json!({ "path": "/echo" })), &context(json!(null)));
    let headers = allowed_headers(&bare.decision);
    for name in ["x-query", "x-user-agent", "x-peer", "x-body", "x-subject", "x-bearer"] {
        assert_eq!(header(&headers, name), "-", "{name}");
    }
    assert_eq!(header(&headers, "x-headers"), "");
}

#[test]
fn the_narrow_credential_getters_answer_what_the_credential_holds() {
    let runtime = runtime();
    let hostile = load(&runtime, "hostile");
    // Each answer read alone, and again from the whole credential read first: the same.
    let read = |mut request: serde_json::Value| {
        let answers = ["/principal", "/principal-after-credential"].map(|path| {
            request["path"] = json!(path);
            let evaluation = runtime.evaluate(&hostile, &check(request.clone()), &context(json!(null)));
            let headers = allowed_headers(&evaluation.decision);
            ["x-subject", "x-roles", "x-scopes", "x-claims", "x-unauthenticated"]
                .map(|name| header(&headers, name).to_owned())
        });
        assert_eq!(answers[0], answers[1], "{request}");
        answers[0].clone()
    };
    let verified = read(json!({ "path": "/principal", "claims": {
        "iss": "https://issuer.example", "sub": "alice", "roles": "reader writer", "scope": "orders:read",
        "tenant": "acme", "org": { "id": 7, "name": "Acme \"Inc\"" } } }));
    assert_eq!(verified, ["alice", "reader,writer", "true false", r#""acme" {"id":7,"name":"Acme \"Inc\""} -"#, "-"]);
    // A verified token without `sub` or roles: an empty subject, no roles.
    let bare = read(json!({ "path": "/principal", "claims": { "iss": "https://issuer.example" } }));
    assert_eq!(bare, ["", "", "false false", "- - -", "-"]);
    // Scopes as an `scp` list; a claim whose value is escaped in the JSON.
    let scp = read(json!({ "path": "/principal", "claims": {
        "iss": "https://issuer.example", "sub": "bob", "scp": ["orders", "orders:read"], "tenant": "gl\"obex" } }));
    assert_eq!(scp, ["bob", "", "true true", r#""gl\"obex" - -"#, "-"]);
    // No credential, and a rejected one: nothing to read, and the usual 401 reason.
    let none = read(json!({ "path": "/principal" }));
    assert_eq!(none, ["-", "", "false false", "- - -", "missing_credential"]);
    let rejected = read(json!({ "path": "/principal",
        "credential_error": { "reason": "token_expired", "message": "the token expired" } }));
    assert_eq!(rejected, ["-", "", "false false", "- - -", "token_expired"]);
}

#[test]
fn a_policy_built_against_contract_0_1_is_still_served() {
    let runtime = runtime();
    let old = load(&runtime, "contract-0-1");
    assert_eq!(old.contract(), Contract::V0_1);
    let request = check(json!({
        "method": "GET", "path": "/api/orders/7", "headers": { "user-agent": "curl/8" }, "now": 1_800_000_000_u64,
        "claims": { "sub": "alice", "roles": ["reader", "writer"] }
    }));
    let evaluation = runtime.evaluate(&old, &request, &context(json!({ "name": "acme" })));
    assert_eq!(
        allowed_headers(&evaluation.decision),
        [
            ("x-method", "GET"),
            ("x-path", "/api/orders/7"),
            ("x-subject", "alice"),
            ("x-roles", "reader,writer"),
            ("x-user-agent", "curl/8"),
            ("x-now", "1800000000"),
            ("x-data", "\"acme\""),
        ]
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
    );
    let anonymous = runtime.evaluate(&old, &check(json!({ "path": "/" })), &context(json!(null)));
    assert_eq!(anonymous.reason(), "missing_credential");
}
