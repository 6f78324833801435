//! The verified-token cache never accepts a token after its `exp`, after it is revoked, or
//! after its key has left the key set, and it stays within its bound.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test: a failed set-up should stop it loudly"
)]

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use sandgate_auth::{IssuerConfig, KeySource, Rejection, VerifiedToken};
use sandgate_server::{Authorizer, Config, RevocationChange};
use serde_json::json;
use std::sync::Arc;

const ISSUER: &str = "https://cache.test";
const SECRET: &str = "a-cache-test-secret-of-at-least-32-bytes";

fn app(cache_size: usize) -> Arc<Authorizer> {
    let mut config = toml_config();
    config.server.token_cache_size = cache_size;
    sandgate_tests::authorizer(&config)
}

fn toml_config() -> Config {
    let mut config: Config = serde_json::from_value(json!({})).unwrap_or_else(|_| unreachable!());
    config.issuers = vec![IssuerConfig {
        issuer: ISSUER.into(),
        audiences: vec![],
        algorithms: vec!["HS256".into()],
        leeway_secs: 0,
        keys: vec![KeySource {
            kid: Some("k1".into()),
            algorithm: Some("HS256".into()),
            pem_file: None,
            jwk_file: None,
            jwks_file: None,
            secret: Some(SECRET.into()),
        }],
        jwks_url: None,
        discovery_url: None,
        jwks_refresh_secs: 300,
        jwks_min_refetch_ms: 10_000,
        jwks_max_stale_secs: None,
    }];
    config
}

fn token(claims: serde_json::Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("k1".into());
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

fn now() -> u64 {
    sandgate_server::unix_now()
}

fn reason(result: Result<VerifiedToken, Rejection>) -> String {
    match result {
        Ok(_) => "accepted".into(),
        Err(rejection) => rejection.reason().into(),
    }
}

#[test]
fn not_after_exp() {
    let app = app(100);
    let exp = now() + 2;
    let t = token(json!({ "iss": ISSUER, "sub": "alice", "exp": exp }));
    assert_eq!(reason(app.verify_token(&t, &app.state().store.load(), now())), "accepted");
    assert_eq!(app.token_cache().unwrap().len(), 0, "a token seen once is not stored");
    assert_eq!(reason(app.verify_token(&t, &app.state().store.load(), now())), "accepted");
    assert_eq!(app.token_cache().unwrap().len(), 1, "the token was cached on its second sighting");
    // At exp the cached entry is not used, whatever the clock the signature check sees.
    let key = sandgate_auth::TokenCache::key(&t, app.state().store.load().keys.version);
    assert!(app.token_cache().unwrap().get(&key, exp).is_none());
    while now() <= exp {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(reason(app.verify_token(&t, &app.state().store.load(), now())), "token_expired");
}

#[test]
fn not_after_revocation() {
    let app = app(100);
    let t = token(json!({ "iss": ISSUER, "sub": "bob", "jti": "j-1", "exp": now() + 600 }));
    assert_eq!(reason(app.verify_token(&t, &app.state().store.load(), now())), "accepted");
    assert_eq!(reason(app.verify_token(&t, &app.state().store.load(), now())), "accepted");
    let change = RevocationChange { jtis: vec!["j-1".into()], subjects: vec![] };
    app.state().change_revocations(&change, true);
    assert_eq!(reason(app.verify_token(&t, &app.state().store.load(), now())), "token_revoked");
    let t2 = token(json!({ "iss": ISSUER, "sub": "carol", "exp": now() + 600 }));
    for _ in 0..2 {
        assert_eq!(reason(app.verify_token(&t2, &app.state().store.load(), now())), "accepted");
    }
    assert_eq!(app.token_cache().unwrap().len(), 2, "both tokens were cached");
    app.state().change_revocations(&RevocationChange { jtis: vec![], subjects: vec!["carol".into()] }, true);
    assert_eq!(reason(app.verify_token(&t2, &app.state().store.load(), now())), "token_revoked");
}

#[test]
fn not_after_its_key_left_the_key_set() {
    let app = app(100);
    let t = token(json!({ "iss": ISSUER, "sub": "dan", "exp": now() + 600 }));
    for _ in 0..2 {
        assert_eq!(reason(app.verify_token(&t, &app.state().store.load(), now())), "accepted");
    }
    assert_eq!(app.token_cache().unwrap().len(), 1, "the token was cached");
    // Rotate to a different key with a different kid: k1 is gone.
    let other = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b"another-secret-of-at-least-32-bytes!!");
    let jwks =
        serde_json::from_value(json!({ "keys": [{ "kty": "oct", "kid": "k2", "alg": "HS256", "k": other }] })).unwrap();
    app.state().rotate_keys(ISSUER, &jwks).unwrap();
    assert_eq!(reason(app.verify_token(&t, &app.state().store.load(), now())), "unknown_kid");
}

#[test]
fn bounded_and_off_when_zero() {
    let app = app(64);
    for i in 0..1_000 {
        let t = token(json!({ "iss": ISSUER, "sub": format!("user-{i}"), "exp": now() + 600 }));
        for _ in 0..2 {
            assert_eq!(reason(app.verify_token(&t, &app.state().store.load(), now())), "accepted");
        }
    }
    let held = app.token_cache().unwrap().len();
    assert!(held <= 64, "the cache holds {held} entries, more than its bound");
    assert!(self::app(0).token_cache().is_none());
}
