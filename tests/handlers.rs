//! The protocol adapters driven without a socket: a request value in, a response value out;
//! and the gRPC listener's bounds on what a peer sends, over a socket.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test: a failed set-up should stop it loudly"
)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use sandgate_server::{AdminApi, Config, ForwardAuth, ProxyKind};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

const ADMIN_TOKEN: &str = "an-admin-token-of-at-least-32-characters";

fn config() -> Config {
    let module = sandgate_tests::workspace().join("target/policies/allow-all.wasm");
    sandgate_tests::policy_bytes("allow-all"); // built if missing
    config_from(&format!(
        "[server]\nproxy = \"nginx\"\ndefault_policy = \"open\"\n[server.identity_headers]\n\"x-auth-subject\" = \"sub\"\n[[policies]]\nid = \"open\"\nmodule = \"{}\"\n",
        module.display()
    ))
}

/// The configuration `text` says, read from a file of its own.
fn config_from(text: &str) -> Config {
    // One file per call: the tests run in parallel, and a file rewritten while another test
    // reads it reads as empty.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("sandgate-handlers-{}-{n}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    Config::from_file(&path).unwrap()
}

fn peer() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1234))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_auth_answers_a_request_value() {
    let authorizer = sandgate_tests::authorizer(&config());
    let service = ForwardAuth::new(authorizer, "/auth", ProxyKind::Nginx, Arc::new(AtomicBool::new(true)));
    let check = |uri: &str| {
        Request::builder()
            .uri("/auth")
            .header("x-original-method", "GET")
            .header("x-original-uri", uri)
            .header("x-forwarded-host", "app")
            .header("x-forwarded-proto", "https")
            .header("x-auth-subject", "admin")
            .body(())
            .unwrap()
    };
    let allowed = service.handle(check("/x"), peer()).await;
    assert_eq!(allowed.status(), StatusCode::OK);
    // No token: the configured identity header is sent empty, over the client's `admin`.
    assert_eq!(allowed.headers()["x-auth-subject"], "");
    let ambiguous = service.handle(check("/public/..;/admin"), peer()).await;
    assert_eq!(
        (ambiguous.status(), &ambiguous.headers()["x-sandgate-reason"]),
        (StatusCode::BAD_REQUEST, &"ambiguous_path".parse().unwrap())
    );
    let health = service.handle(Request::builder().uri("/healthz").body(()).unwrap(), peer()).await;
    assert_eq!(health.status(), StatusCode::OK);
    let unknown = service.handle(Request::builder().uri("/elsewhere").body(()).unwrap(), peer()).await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_answers_a_request_value() {
    let authorizer = sandgate_tests::authorizer(&config());
    let api = AdminApi::new(authorizer.state().clone(), Some(ADMIN_TOKEN.into()));
    let call = |method: &str, path: &str, token: &str, body: &'static str| {
        Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    };
    let snapshot = api.handle(call("GET", "/v1/snapshot", ADMIN_TOKEN, "")).await;
    assert_eq!(snapshot.status(), StatusCode::OK);
    let body: serde_json::Value =
        serde_json::from_slice(&snapshot.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["policies"][0]["id"], "open");
    assert_eq!(api.handle(call("GET", "/v1/snapshot", "wrong", "")).await.status(), StatusCode::UNAUTHORIZED);
    let bad = api.handle(call("PUT", "/v1/policies/open/data", ADMIN_TOKEN, "{not json")).await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let missing = api.handle(call("DELETE", "/v1/policies/nothing", ADMIN_TOKEN, "")).await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let routed = api.handle(call("DELETE", "/v1/policies/open", ADMIN_TOKEN, "")).await;
    assert_eq!(routed.status(), StatusCode::CONFLICT, "the default policy cannot be unloaded");
}

/// A check whose proxy reported no client address (Envoy without a source address) gives the
/// policy no peer, as the contract says, not an empty one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_without_a_client_address_has_no_peer() {
    let module = sandgate_tests::workspace().join("target/policies/hostile-wasip2-servable.wasm");
    let authorizer = sandgate_tests::authorizer(&config_from(&format!(
        "[server]\nproxy = \"envoy\"\ndefault_policy = \"hostile\"\n[[policies]]\nid = \"hostile\"\nmodule = \"{}\"\n",
        module.display()
    )));
    for (reported, seen) in [("", "-"), ("10.0.0.7", "10.0.0.7")] {
        let mut original = records_request("/echo".into(), Vec::new());
        original.peer = reported.into();
        let answer = authorizer.decide(original).await;
        assert_eq!(sandgate_tests::allowed_header(&answer.evaluation.decision, "x-peer"), seen, "peer {reported:?}");
    }
}

/// A decision-log sink kept in memory.
#[derive(Clone, Default)]
struct Kept(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Kept {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const RECORDS_SECRET: &str = "a-test-hs256-secret-of-at-least-32-bytes";

/// A sidecar's configuration: the hostile policy behind Envoy, HS256 tokens of `RECORDS_SECRET`.
fn records_config() -> Config {
    let module = sandgate_tests::workspace().join("target/policies/hostile-wasip2-servable.wasm");
    config_from(&format!(
        "[server]\nproxy = \"envoy\"\ndefault_policy = \"hostile\"\n[[issuers]]\nissuer = \"https://issuer.test\"\naudiences = [\"app\"]\nalgorithms = [\"HS256\"]\n[[issuers.keys]]\nkid = \"k\"\nalgorithm = \"HS256\"\nsecret = \"{RECORDS_SECRET}\"\n[[policies]]\nid = \"hostile\"\nmodule = \"{}\"\n",
        module.display()
    ))
}

/// A token for `subject`, verified by [`records_config`]'s issuer.
fn records_token(subject: &str) -> String {
    records_token_with(subject, serde_json::json!({}))
}

/// [`records_token`] with `extra` claims.
fn records_token_with(subject: &str, extra: serde_json::Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("k".into());
    let mut claims =
        serde_json::json!({"iss": "https://issuer.test", "aud": "app", "sub": subject, "exp": 4_000_000_000u64});
    if let (Some(claims), serde_json::Value::Object(extra)) = (claims.as_object_mut(), extra) {
        claims.extend(extra);
    }
    jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_secret(RECORDS_SECRET.as_bytes())).unwrap()
}

/// A `GET` of `https://app` `path` from 10.0.0.7 with `headers`.
fn records_request(path: String, headers: Vec<(&str, String)>) -> sandgate_server::OriginalRequest {
    use sandgate_runtime::bindings::sandgate::policy::types::Header;
    sandgate_server::OriginalRequest {
        method: "GET".into(),
        scheme: "https".into(),
        host: "app".into(),
        path,
        headers: headers.into_iter().map(|(name, value)| Header { name: name.into(), value }).collect(),
        peer: "10.0.0.7:4000".into(),
        ..Default::default()
    }
}

/// An authorizer for `config` writing its records with `capture` into memory; its tasks (shadow
/// evaluations) tracked by the tracker returned.
async fn recording_authorizer(
    config: &Config,
    capture: sandgate_server::config::Capture,
) -> (Arc<sandgate_server::Authorizer>, sandgate_server::decision_log::LogWriter, Kept, tokio_util::task::TaskTracker) {
    let state = sandgate_server::State::from_config(config).await.unwrap();
    let kept = Kept::default();
    let dropped = state.metrics.decision_log_dropped.clone();
    let (log, writer) = sandgate_server::DecisionLog::start(Box::new(kept.clone()), 1 << 20, dropped).unwrap();
    let tasks = tokio_util::task::TaskTracker::new();
    let authorizer = sandgate_server::Authorizer::new(state, Default::default(), 100, log, tasks.clone());
    (Arc::new(authorizer.with_capture(capture, Vec::new())), writer, kept, tasks)
}

/// The bearer token, and a token the policy verified, stay out of the record with either
/// capture: sent in the path (Envoy sends the path itself, in no header), written by the policy
/// in a log line, in the path of a check the host refused before any policy ran, or in a
/// forwarded body (which the record holds as base64, where a search of the line cannot find it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_reaches_no_record_through_the_path_a_policy_log_line_or_the_body() {
    use sandgate_server::config::Capture;
    let config = records_config();
    let (bearer, id_token) = (records_token("alice"), records_token("alice-id"));
    for capture in [Capture::Metadata, Capture::Input] {
        let (authorizer, writer, kept, _) = recording_authorizer(&config, capture).await;
        let authorization = || ("authorization", format!("Bearer {bearer}"));
        let in_path = authorizer.decide(records_request(format!("/share/{bearer}"), vec![authorization()])).await;
        assert!(in_path.evaluation.is_allow(), "{capture:?}");
        let logged =
            authorizer.decide(records_request("/log-id-token".into(), vec![("x-id-token", id_token.clone())])).await;
        assert!(logged.evaluation.is_allow(), "{capture:?}");
        let refused = authorizer.decide(records_request(format!("/{bearer}/..;/admin"), vec![authorization()])).await;
        assert_eq!(refused.evaluation.reason(), "ambiguous_path", "{capture:?}");
        // RFC 6750's form-encoded body parameter, forwarded by the proxy (written as base64).
        let mut posted = records_request("/upload".into(), vec![authorization()]);
        posted.method = "POST".into();
        posted.body = Some(format!("access_token={bearer}&note=1").into_bytes());
        assert!(authorizer.decide(posted).await.evaluation.is_allow(), "{capture:?}");
        // A token inside the bearer's claims, which the policy verifies: written nowhere else.
        let carrier = records_token_with("alice", serde_json::json!({"id_token": id_token}));
        let in_claims = authorizer
            .decide(records_request("/verify-claim-token".into(), vec![("authorization", format!("Bearer {carrier}"))]))
            .await;
        assert!(in_claims.evaluation.is_allow(), "{capture:?}: {:?}", in_claims.evaluation.decision);
        writer.finish(std::time::Duration::from_secs(10)).await;

        let text = String::from_utf8(kept.0.lock().unwrap().clone()).unwrap();
        assert!(
            !text.contains(&bearer) && !text.contains(&id_token),
            "{capture:?}: a token reached the record:\n{text}"
        );
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 5, "{capture:?}");
        assert_eq!(lines[0]["path"], "/share/[redacted]", "{capture:?}");
        assert_eq!(lines[1]["policy_logs"][0]["message"], "id token [redacted]: verified", "{capture:?}");
        assert_eq!(lines[2]["path"], "/[redacted]/..;/admin", "{capture:?}");
        if capture == Capture::Input {
            use base64::Engine;
            assert_eq!(lines[0]["input"]["path"], "/share/[redacted]");
            let body = base64::engine::general_purpose::STANDARD.decode(lines[3]["input"]["body"].as_str().unwrap());
            assert_eq!(body.unwrap(), b"access_token=[redacted]&note=1");
        }
    }
}

/// With `capture = "input"`, a record's input is the check as the policy saw it (credentials
/// redacted), with the answers of the policy's `verify-jwt` calls, which replay gives it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_input_is_the_check_the_policy_saw_and_carries_its_verify_jwt_answers() {
    let config = records_config();
    let (authorizer, writer, kept, _) = recording_authorizer(&config, sandgate_server::config::Capture::Input).await;
    let bearer = records_token("alice");
    let mut plain = records_request("/orders/7".into(), vec![("authorization", format!("Bearer {bearer}"))]);
    plain.query = Some("page=2".into());
    assert!(authorizer.decide(plain).await.evaluation.is_allow());
    let verifying = records_request("/log-id-token".into(), vec![("x-id-token", records_token("alice-id"))]);
    assert!(authorizer.decide(verifying).await.evaluation.is_allow());
    writer.finish(std::time::Duration::from_secs(10)).await;

    let text = String::from_utf8(kept.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{text}");
    let input = &lines[0]["input"];
    assert_eq!(
        (&input["method"], &input["path"], &input["query"], &input["peer"]),
        (&"GET".into(), &"/orders/7".into(), &"page=2".into(), &"10.0.0.7:4000".into())
    );
    assert_eq!(input["headers"], serde_json::json!([["authorization", "[redacted]"]]));
    // Format 2 writes nothing twice: the pinned time and versions are the record's own, and the
    // standard claims are what `claims_json` gives.
    let credential = &input["credential"];
    assert_eq!((&credential["kind"], credential.get("subject")), (&"verified".into(), None), "{credential}");
    let claims: serde_json::Value = serde_json::from_str(credential["claims_json"].as_str().unwrap()).unwrap();
    assert_eq!((&claims["sub"], &lines[0]["subject"]), (&"alice".into(), &"alice".into()));
    assert!(input.get("versions").is_none() && input.get("now").is_none(), "{input}");
    assert_eq!((&lines[0]["v"], lines[0]["policy_digest"].as_str().map(str::len)), (&2.into(), Some(64)));
    assert!(input.get("verify_jwt").is_none(), "{input}");
    let answers = lines[1]["input"]["verify_jwt"].as_array().expect("the verify-jwt answers");
    assert_eq!(answers.len(), 1, "{}", lines[1]);
    assert_eq!(lines[1]["input"]["path"], "/log-id-token");
}

/// A token where a record's bound cuts the text it is in: the path's summary (2,048 bytes), the
/// client's request id (128) and a policy's log line (1,024). A search for the whole token does
/// not find the part before the cut; it used to stay in the record, all of the token but its
/// last characters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_cut_by_a_records_bound_leaves_no_part_of_it() {
    use sandgate_server::config::Capture;
    let config = records_config();
    let bearer = records_token("alice");
    // An id token long enough that the policy's line `id token <token>: verified` is cut in its
    // signature.
    let id_token = (0..2000)
        .map(|pad| records_token_with("alice-id", serde_json::json!({"pad": "p".repeat(pad)})))
        .find(|t| "id token ".len() + t.len() > sandgate_runtime::MAX_LOG_LINE + 5)
        .unwrap();
    for capture in [Capture::Metadata, Capture::Input] {
        let (authorizer, writer, kept, _) = recording_authorizer(&config, capture).await;
        let authorization = || ("authorization", format!("Bearer {bearer}"));
        let path = format!("/share/{}{bearer}", "a".repeat(2048 - "/share/".len() - (bearer.len() - 3)));
        let request =
            records_request(path, vec![authorization(), ("x-request-id", format!("{}{bearer}", "r".repeat(100)))]);
        assert!(authorizer.decide(request).await.evaluation.is_allow(), "{capture:?}");
        let logged = records_request("/log-id-token".into(), vec![authorization(), ("x-id-token", id_token.clone())]);
        assert!(authorizer.decide(logged).await.evaluation.is_allow(), "{capture:?}");
        writer.finish(std::time::Duration::from_secs(10)).await;

        let text = String::from_utf8(kept.0.lock().unwrap().clone()).unwrap();
        for token in [&bearer, &id_token] {
            let part = (0..token.len() - 24).step_by(4).find(|&at| text.contains(&token[at..at + 24]));
            assert!(part.is_none(), "{capture:?}: part of a token reached the record at {part:?}:\n{text}");
        }
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines[0]["path"], format!("/share/{}", "a".repeat(2048 - "/share/".len() - (bearer.len() - 3))));
        assert_eq!(lines[0]["client_request_id"], "r".repeat(100), "{capture:?}");
        assert_eq!(lines[1]["policy_logs"][0]["message"], "id token [redacted]", "{capture:?}");
    }
}

/// A shadow candidate's disagreement line names both answers, and so their headers: the
/// bearer token the primary echoed upstream is replaced there too. A client's bearer value
/// that is no JWT (here: its own path) is not a secret, so it cannot hide the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_disagreement_holds_no_token_and_a_client_cannot_redact_its_own_path() {
    let config = records_config();
    let (authorizer, writer, kept, tasks) =
        recording_authorizer(&config, sandgate_server::config::Capture::Metadata).await;
    let candidate = sandgate_tests::policy_bytes("allow-all");
    authorizer.state().set_shadow("hostile", Some(candidate.into())).await.unwrap();
    let bearer = records_token("alice");
    // The primary echoes every header upstream (the candidate adds none): they disagree.
    let echoed =
        authorizer.decide(records_request("/echo".into(), vec![("authorization", format!("Bearer {bearer}"))])).await;
    assert!(echoed.evaluation.is_allow());
    let path = "/api/admin/export-all-customers";
    let hidden =
        authorizer.decide(records_request(path.into(), vec![("authorization", format!("Bearer {path}"))])).await;
    assert_eq!(hidden.evaluation.reason(), "allow", "the hostile policy allows any other path");
    tasks.close();
    tasks.wait().await;
    writer.finish(std::time::Duration::from_secs(10)).await;

    let text = String::from_utf8(kept.0.lock().unwrap().clone()).unwrap();
    assert!(!text.contains(&bearer), "a token reached the record:\n{text}");
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let shadow = lines.iter().find(|l| l["shadow_disagreement"] == true).expect("a disagreement line");
    assert!(shadow["primary"].as_str().unwrap().contains("Bearer [redacted]"), "{shadow}");
    assert!(lines.iter().any(|l| l["path"] == path), "the path is recorded as sent:\n{text}");
}

/// A protobuf length-delimited field.
fn protobuf_field(tag: u32, payload: &[u8]) -> Vec<u8> {
    fn varint(mut n: u64, out: &mut Vec<u8>) {
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }
    let mut out = Vec::with_capacity(payload.len() + 10);
    varint(u64::from(tag << 3 | 2), &mut out);
    varint(payload.len() as u64, &mut out);
    out.extend_from_slice(payload);
    out
}

/// A whole gRPC `CheckRequest` message (with its 5-byte prefix) for `GET app/x` with `body`.
fn grpc_check(body: &[u8]) -> Bytes {
    let http =
        [protobuf_field(2, b"GET"), protobuf_field(4, b"/x"), protobuf_field(5, b"app"), protobuf_field(11, body)]
            .concat();
    let message = protobuf_field(1, &protobuf_field(4, &protobuf_field(2, &http)));
    let mut framed = vec![0];
    framed.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(&message);
    Bytes::from(framed)
}

/// The start of a gRPC message that announces `length` bytes and brings `sent` of them.
fn grpc_message_start(length: u32, sent: usize) -> Bytes {
    let mut part = vec![0];
    part.extend_from_slice(&length.to_be_bytes());
    part.resize(5 + sent, b'a');
    Bytes::from(part)
}

/// The ext_authz `Check` method's path.
const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";
/// gRPC status codes.
const DEADLINE_EXCEEDED: u32 = 4;
const RESOURCE_EXHAUSTED: u32 = 8;

/// Open a gRPC call to `path`, sending nothing yet.
async fn grpc_open(
    client: h2::client::SendRequest<Bytes>,
    path: &str,
) -> (h2::client::SendRequest<Bytes>, h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let mut client = client.ready().await.unwrap();
    let request = Request::post(format!("http://sandgate{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, send) = client.send_request(request, false).unwrap();
    (client, response, send)
}

/// Open a `Check` call and send `data`, finished or not.
async fn grpc_call(
    client: h2::client::SendRequest<Bytes>,
    data: Bytes,
    finished: bool,
) -> (h2::client::SendRequest<Bytes>, h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let (client, response, mut send) = grpc_open(client, CHECK).await;
    send.send_data(data, finished).unwrap();
    (client, response, send)
}

/// Calls that each end past the budget or at their deadline, at least one for the budget.
async fn refused(responses: Vec<h2::client::ResponseFuture>) {
    let mut codes = Vec::new();
    for response in responses {
        codes.push(grpc_code(response).await.expect("a call past the budget or its deadline is answered"));
    }
    assert!(codes.iter().all(|c| [DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED].contains(c)), "{codes:?}");
    assert!(codes.contains(&RESOURCE_EXHAUSTED), "nothing was refused for the budget: {codes:?}");
}

/// The call's gRPC status code, from its headers (an error answered at once) or its trailers.
/// `None` if it is not answered within 10 s (a liveness bound, not a measurement).
async fn grpc_code(response: h2::client::ResponseFuture) -> Option<u32> {
    let code = |headers: &hyper::HeaderMap| headers.get("grpc-status").map(|v| v.to_str().unwrap().parse().unwrap());
    let answered = async {
        let response = response.await.unwrap();
        if let Some(code) = code(response.headers()) {
            return code;
        }
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            let _ = body.flow_control().release_capacity(chunk.unwrap().len());
        }
        code(&body.trailers().await.unwrap().expect("trailers")).expect("grpc-status")
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), answered).await.ok()
}

/// A peer that opens `Check` calls and never finishes their messages (or never starts them)
/// holds neither memory nor the calls for good. Each call used to wait, its part of a message of up to 1 MiB buffered,
/// for as long as the connection lived: 200 streams on each connection, ~200 MiB a connection,
/// none of it bounded in time. Now the listener holds at most `max_receiving_bytes` of bodies
/// being received, ends a call past it with `RESOURCE_EXHAUSTED`, ends one whose message is
/// late with `DEADLINE_EXCEEDED` (both a deny at Envoy), and releases what a call held when it
/// ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_checks_that_never_finish_arriving_are_ended_and_their_bytes_bounded() {
    use sandgate_server::listener::{self, Limits, Listener};
    use std::time::Duration;
    let routes = sandgate_server::ext_authz::routes(sandgate_tests::authorizer(&config())).await;
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = socket.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let limits =
        Limits { body_read_timeout: Duration::from_millis(500), max_receiving_bytes: 2 << 20, ..Limits::default() };
    let make = move |_| hyper_util::service::TowerToHyperService::new(routes.clone());
    tokio::spawn(listener::serve(
        "grpc",
        Listener::Tcp(socket),
        make,
        limits,
        listener::ConnectionMetrics::default(),
        stop.clone(),
        Duration::from_secs(1),
    ));
    let (mut client, connection) =
        h2::client::handshake(tokio::net::TcpStream::connect(address).await.unwrap()).await.unwrap();
    tokio::spawn(connection);

    // Six calls, each 600 KiB into a message of 1,000,000 bytes: 3.5 MiB against a budget of
    // 2 MiB. Every one is answered; at least one for the budget.
    let (mut responses, mut unfinished) = (Vec::new(), Vec::new());
    for _ in 0..6 {
        let (next, response, send) = grpc_call(client, grpc_message_start(1_000_000, 600 << 10), false).await;
        client = next;
        responses.push(response);
        unfinished.push(send);
    }
    refused(responses).await;

    // A call within the budget whose message stops arriving ends at its deadline.
    let (next, response, send) = grpc_call(client, grpc_message_start(200_000, 100 << 10), false).await;
    client = next;
    unfinished.push(send);
    assert_eq!(grpc_code(response).await, Some(DEADLINE_EXCEEDED));

    // Calls whose message never starts hold their headers and streams: each is charged for
    // itself, so 150 of them do not all wait for their deadline (they did).
    let mut responses = Vec::new();
    for _ in 0..150 {
        let (next, response, send) = grpc_open(client, CHECK).await;
        client = next;
        responses.push(response);
        unfinished.push(send);
    }
    refused(responses).await;

    // Every byte those calls held was released: a whole 900 KiB check is decided (allowed).
    let (next, response, _send) = grpc_call(client, grpc_check(&vec![b'b'; 900 << 10]), true).await;
    assert_eq!(grpc_code(response).await, Some(0));
    // A whole message is decided even if its stream is never ended: the call used to wait
    // for its deadline holding the decoded message, and end DEADLINE_EXCEEDED.
    let (next, response, _open) = grpc_call(next, grpc_check(b""), false).await;
    assert_eq!(grpc_code(response).await, Some(0));
    // A health watch, whose answer never ends, is not served.
    let (_, response, mut send) = grpc_open(next, "/grpc.health.v1.Health/Watch").await;
    // The server may answer from the headers alone and end the stream before this is sent.
    let _ = send.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true);
    assert_eq!(grpc_code(response).await, Some(12), "UNIMPLEMENTED");
    stop.cancel();
}
