//! What writing the captured input and answer of one check into a record line costs: the
//! borrowed views written directly (`write_json`, what the decision log does), the same views
//! through `serde_json`, and the check copied into the owned [`Input`] and [`DecisionRecord`]
//! first. The check is what nginx sends for a reader's `GET`
//! with a verified HS256 token (seven headers, a 200-byte claims document).
//!
//! ```sh
//! cargo bench -p sandgate-records --features bench --bench record
//! ```

use criterion::{Criterion, criterion_group, criterion_main};
use sandgate_records::{DecisionRecord, DecisionView, Input, InputView, VerifyAnswer};
use sandgate_runtime::bindings::sandgate::policy::types::{
    AllowResponse, CheckRequest, Credential, Decision, Header, SnapshotVersions, StandardClaims, VerifiedCredential,
};
use std::hint::black_box;

fn check() -> CheckRequest {
    let header = |name: &str, value: &str| Header { name: name.into(), value: value.into() };
    let claims_json = r#"{"iss":"https://issuer.bench","aud":"bench","sub":"user-417@example.com","iat":1764547200,"exp":1764550800,"jti":"000001a1-692c5a80","roles":["reader","auditor"]}"#;
    CheckRequest {
        request_id: "0194d3c5-7b7e-7cc1-8a33-5f0e2b6d9a41".into(),
        method: "GET".into(),
        scheme: "https".into(),
        host: "api.test".into(),
        path: "/api/orders/418207".into(),
        query: None,
        headers: vec![
            header("host", "127.0.0.1:8181"),
            header(
                "authorization",
                &format!("Bearer eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiIsImtpZCI6ImsifQ.{}", "x".repeat(240)),
            ),
            header("x-original-uri", "/api/orders/418207"),
            header("x-original-method", "GET"),
            header("x-forwarded-host", "api.test"),
            header("x-forwarded-proto", "https"),
            header("user-agent", "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"),
        ],
        peer: Some("127.0.0.1:53412".into()),
        body: None,
        credential: Credential::Verified(VerifiedCredential {
            key_id: Some("k".into()),
            algorithm: "HS256".into(),
            claims: StandardClaims {
                issuer: "https://issuer.bench".into(),
                subject: "user-417@example.com".into(),
                audiences: vec!["bench".into()],
                expires_at: Some(1_764_550_800),
                issued_at: Some(1_764_547_200),
                token_id: Some("000001a1-692c5a80".into()),
                scopes: Vec::new(),
                roles: vec!["reader".into(), "auditor".into()],
            },
            claims_json: claims_json.into(),
        }),
        now: 1_764_547_260,
        versions: SnapshotVersions {
            snapshot: 3,
            policy_digest: "9f2c1e7a5b3d4f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8".into(),
            key_set: 1,
            revocations: 1,
            data: 1,
        },
    }
}

fn bench(c: &mut Criterion) {
    let check = check();
    let redact: Vec<String> = Vec::new();
    let verify_jwt: Vec<VerifyAnswer> = Vec::new();
    let decision = Decision::Allow(AllowResponse { set_headers: Vec::new(), remove_headers: Vec::new() });
    let mut line = Vec::with_capacity(4096);
    let mut group = c.benchmark_group("record");
    group.bench_function("borrowed views", |b| {
        b.iter(|| {
            line.clear();
            let input = InputView::new(black_box(&check), &redact, &verify_jwt);
            let _ = serde_json::to_writer(&mut line, &(input, DecisionView(black_box(&decision))));
            black_box(line.len())
        })
    });
    group.bench_function("borrowed views, written directly", |b| {
        b.iter(|| {
            line.clear();
            InputView::new(black_box(&check), &redact, &verify_jwt).write_json(&mut line);
            DecisionView(black_box(&decision)).write_json(&mut line);
            black_box(line.len())
        })
    });
    group.bench_function("copied into the owned records", |b| {
        b.iter(|| {
            line.clear();
            let input = Input::capture(black_box(&check), &redact, verify_jwt.clone());
            let _ = serde_json::to_writer(&mut line, &(input, DecisionRecord::from(black_box(&decision))));
            black_box(line.len())
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
