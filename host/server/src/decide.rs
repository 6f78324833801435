//! The protocol-agnostic decision path (DESIGN "The request path", steps 2–6): pin `now` and a
//! snapshot once, route, authenticate, evaluate in a fresh instance, then count and log. HTTP
//! forward-auth and Envoy ext_authz both turn their request into an [`OriginalRequest`] and
//! answer the [`Answer`] this returns in their own protocol.

pub use crate::answer::Answer;
use crate::config::Capture;
use crate::credential;
use crate::decision_log::{DecisionLog, DecisionLogEntry};
use crate::metrics::{DecisionLabels, ShadowLabels};
use crate::original_request::{Bearer, OriginalRequest, bearer_of, canonical_path};
use crate::otel::{AuthTrace, CheckTrace, EvalTrace, Tracing};
use crate::snapshot::{LoadedPolicy, Snapshot};
use crate::state::State;
use opentelemetry::KeyValue;
use sandgate_auth::{Rejection, TokenCache, VerifiedToken, check_revocation};
use sandgate_records::{SUMMARY_BOUNDS, bounded};
use sandgate_runtime::bindings::sandgate::policy::types::{
    CheckRequest, Credential, CredentialError, Decision, Header, VerifiedCredential,
};
use sandgate_runtime::{EvalContext, Evaluation, PolicyLog, PolicyModule, Start, TokenVerifier, spec};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// What [`Authorizer::record`] knows of a check a policy decided.
struct Checked<'a> {
    policy: &'a LoadedPolicy,
    check: &'a CheckRequest,
    /// The answers of the policy's `verify-jwt` calls (recorded with `capture = "input"`).
    verify_jwt: Vec<sandgate_records::VerifyAnswer>,
    /// The tokens the policy passed to `verify-jwt` (with any capture): kept out of the record.
    verified_tokens: Vec<String>,
}

/// A `verify-jwt` verifier that keeps the tokens it was given, to keep them out of the record,
/// and, for a captured input, its answers.
struct Recording {
    snapshot: Arc<Snapshot>,
    keep_answers: bool,
    answers: std::sync::Mutex<(Vec<sandgate_records::VerifyAnswer>, Vec<String>)>,
}

impl Recording {
    fn new(snapshot: Arc<Snapshot>, keep_answers: bool) -> Self {
        Recording { snapshot, keep_answers, answers: std::sync::Mutex::new((Vec::new(), Vec::new())) }
    }

    /// The answers, and the tokens asked about.
    fn answers(&self) -> (Vec<sandgate_records::VerifyAnswer>, Vec<String>) {
        std::mem::take(&mut *self.answers.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl TokenVerifier for Recording {
    fn verify(&self, token: &str) -> Result<VerifiedCredential, CredentialError> {
        let answer = self.snapshot.verify(token);
        let mut kept = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        if self.keep_answers {
            kept.0.push(sandgate_records::VerifyAnswer::from(&answer));
        }
        kept.1.push(token.to_owned());
        answer
    }
}

/// The texts of a check's credential and of its `verify-jwt` answers that a record carries:
/// every claim (`claims_json` holds them all) and every rejection's message.
fn credential_texts<'a>(
    credential: &'a Credential,
    answers: &'a [sandgate_records::VerifyAnswer],
) -> impl Iterator<Item = &'a str> {
    use sandgate_records::VerifyAnswer;
    let own = match credential {
        Credential::None => None,
        Credential::Verified(v) => Some(v.claims_json.as_str()),
        Credential::Rejected(e) => Some(e.message.as_str()),
    };
    own.into_iter().chain(answers.iter().map(|answer| match answer {
        VerifyAnswer::Verified(v) => v.claims_json.as_str(),
        VerifyAnswer::Rejected(e) => e.message.as_str(),
    }))
}

/// The strings of a policy's answer that a decision record writes.
fn decision_texts(decision: &Decision) -> impl Iterator<Item = &str> {
    let (reason, message, headers, removed): (&str, &str, _, &[String]) = match decision {
        Decision::Allow(a) => ("", "", &a.set_headers, &a.remove_headers),
        Decision::Deny(d) => (&d.reason, &d.message, &d.headers, &[]),
    };
    let headers = headers.iter().flat_map(|h| [h.name.as_str(), h.value.as_str()]);
    [reason, message].into_iter().chain(headers).chain(removed.iter().map(String::as_str))
}

/// A shadow candidate to evaluate beside a check, with the verifier that notes the tokens it
/// passes to `verify-jwt`.
struct Shadow {
    candidate: PolicyModule,
    policy: String,
    context: EvalContext,
    verifier: Arc<Recording>,
}

/// `text` cut to at most `max` bytes as [`bounded`] cuts it, but never inside one of
/// `secrets`: a secret the cut would split ends the text where it starts (whole ones are
/// replaced when the line is written; a part of one would not be found).
fn bounded_clear<'t>(text: &'t str, max: usize, secrets: &[&str]) -> &'t str {
    let mut end = bounded(text, max).len();
    if end == text.len() {
        return text;
    }
    // Moving the end back can put it inside another occurrence: until none straddles it.
    loop {
        let straddling = secrets.iter().filter(|s| !s.is_empty()).find_map(|secret| {
            let from = end.saturating_sub(secret.len() - 1);
            let to = (end + secret.len() - 1).min(text.len());
            memchr::memmem::find_iter(&text.as_bytes()[from..to], secret.as_bytes())
                .map(|at| from + at)
                .find(|&start| start < end && start + secret.len() > end)
        });
        match straddling {
            Some(start) => end = start,
            None => break,
        }
    }
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The shortest end of a secret that is worth hiding: a shorter one is part of every JWT's
/// header.
const PARTIAL_SECRET: usize = 8;

/// `logs` with a message that ends in the beginning of one of `secrets` (a line cut at its
/// bound in the middle of a token) ending in [`REDACTED`] instead; `None` if none does.
fn logs_clear_of(logs: &[PolicyLog], secrets: &[&str]) -> Option<Vec<PolicyLog>> {
    let partial = |message: &str| {
        secrets
            .iter()
            .filter_map(|secret| {
                (PARTIAL_SECRET..secret.len().min(message.len() + 1)).rev().find(|&n| message.ends_with(&secret[..n]))
            })
            .max()
    };
    if secrets.is_empty() || !logs.iter().any(|l| partial(&l.message).is_some()) {
        return None;
    }
    Some(
        logs.iter()
            .map(|log| match partial(&log.message) {
                Some(n) => PolicyLog {
                    level: log.level,
                    message: format!("{}{}", &log.message[..log.message.len() - n], sandgate_records::REDACTED),
                },
                None => log.clone(),
            })
            .collect(),
    )
}

/// The bearer token of a check's `Authorization` header, if it has one.
fn bearer_secret(headers: &[Header]) -> Option<&str> {
    match bearer_of(headers) {
        Bearer::Token(token) => Some(token),
        _ => None,
    }
}

/// Headers some frameworks take as the request's method instead of its own (lowercase).
const METHOD_OVERRIDES: [&str; 3] = ["x-http-method-override", "x-method-override", "x-http-method"];

/// Headers some frameworks and servers take as the request's URL instead of its own (Laminas,
/// Symfony before 5.4, Drupal, IIS's URL rewriting).
const URL_OVERRIDES: [&str; 2] = ["x-original-url", "x-rewrite-url"];

/// Whether header `name` is `wanted` (ignoring ASCII case), or is written with `_` where
/// `wanted` has `-`: Rack before Puma 6.4.3, PHP-FPM, CGI and some WSGI servers turn both into
/// the same variable (`HTTP_X_HTTP_METHOD_OVERRIDE`), so the upstream reads either spelling as
/// the header.
fn names(name: &str, wanted: &str) -> bool {
    name.len() == wanted.len()
        && name.bytes().zip(wanted.bytes()).all(|(a, b)| a.eq_ignore_ascii_case(&b) || (a == b'_' && b == b'-'))
}

/// Why a request must be refused (400) before any policy runs, because the upstream could
/// read it as another request than the one Sandgate would judge: `(reason, message)`.
fn misleading_header(
    original: &OriginalRequest,
    identity_headers: &BTreeMap<String, String>,
) -> Option<(&'static str, String)> {
    for header in &original.headers {
        let name = header.name.as_str();
        // A header naming another method: the policy would judge one method while an upstream
        // that honours the header (Express, Symfony, Spring, Rails) runs the other.
        if METHOD_OVERRIDES.iter().any(|m| names(name, m))
            && !header.value.trim().eq_ignore_ascii_case(&original.method)
        {
            return Some(("method_override", format!("`{name}` names another method than the request's")));
        }
        // The same for the URL: the policy would judge one path, the upstream route another.
        if URL_OVERRIDES.iter().any(|u| names(name, u)) {
            let value = header.value.trim();
            let same = match value.strip_prefix(original.path.as_str()) {
                Some("") => true,
                Some(rest) => rest.strip_prefix('?').is_some_and(|q| original.query.as_deref() == Some(q)),
                None => false,
            };
            if !same {
                return Some(("url_override", format!("`{name}` names another URL than the request's")));
            }
        }
        // `X_Auth_Subject` beside (or instead of) the `X-Auth-Subject` the proxy sets: an
        // upstream reading both as one variable may take the client's.
        if name.contains('_') && identity_headers.keys().any(|h| names(name, h)) {
            return Some(("ambiguous_identity", format!("`{name}` is another spelling of an identity header")));
        }
        // Envoy joins repeated headers with commas before Sandgate sees them, so two
        // `Authorization` headers arrive as one; a token never holds a comma.
        if name == "authorization" && header.value.contains(',') {
            return Some(("ambiguous_authorization", "the `Authorization` header holds more than one value".into()));
        }
    }
    None
}

/// Distinct reason codes the decision metric keeps as labels; later ones count as `other`.
const MAX_REASON_LABELS: usize = 256;

/// The longest a check waits for a JWKS fetch triggered by an unknown `kid`.
const UNKNOWN_KID_WAIT: Duration = Duration::from_secs(2);

/// The time now, Unix seconds. A check reads it once, in [`Authorizer::decide`].
pub use sandgate_auth::unix_now;

/// Policy logic compiled into the host: for the load benchmark's native baseline only.
#[cfg(feature = "bench-internals")]
pub type NativePolicy = Arc<
    dyn Fn(
            &CheckRequest,
            &sandgate_runtime::PolicyData,
        ) -> sandgate_runtime::bindings::sandgate::policy::types::Decision
        + Send
        + Sync,
>;

/// Decides checks against the served [`State`].
pub struct Authorizer {
    state: Arc<State>,
    /// Extra identity headers on an allow: header name → claim name.
    identity_headers: BTreeMap<String, String>,
    /// Verified tokens; `None` when `token_cache_size` is 0.
    token_cache: Option<TokenCache>,
    request_ids: AtomicU64,
    id_prefix: String,
    log: DecisionLog,
    /// Reason codes seen as metric labels so far.
    reason_labels: std::sync::RwLock<std::collections::HashSet<String>>,
    /// Shadow evaluations run here, so shutdown waits for them.
    tasks: tokio_util::task::TaskTracker,
    /// What a decision record carries.
    capture: Capture,
    /// Spans of checks, exported over OTLP; `None`: tracing is off.
    tracing: Option<Arc<Tracing>>,
    /// Headers a captured input redacts, besides the credentials.
    redact: Vec<String>,
    #[cfg(feature = "bench-internals")]
    native: Option<NativePolicy>,
}

impl Authorizer {
    /// An authorizer over `state`.
    pub fn new(
        state: Arc<State>,
        identity_headers: BTreeMap<String, String>,
        token_cache_size: usize,
        log: DecisionLog,
        tasks: tokio_util::task::TaskTracker,
    ) -> Self {
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        Authorizer {
            state,
            identity_headers,
            token_cache: TokenCache::new(token_cache_size),
            request_ids: AtomicU64::new(0),
            id_prefix: format!("{:08x}", nanos ^ std::process::id()),
            log,
            reason_labels: Default::default(),
            tasks,
            capture: Capture::Metadata,
            redact: Vec::new(),
            tracing: None,
            #[cfg(feature = "bench-internals")]
            native: None,
        }
    }

    /// The same authorizer with policies evaluated by `native` instead of in Wasm: the load
    /// benchmark's baseline (same HTTP, JWT verification, snapshot and decision log). Never
    /// for production: there is no isolation.
    #[cfg(feature = "bench-internals")]
    pub fn with_native_baseline(mut self, native: NativePolicy) -> Self {
        self.native = Some(native);
        self
    }

    /// The same authorizer writing decision records with `capture`, redacting `redact`
    /// (lowercase header names) besides the credentials.
    pub fn with_capture(mut self, capture: Capture, redact: Vec<String>) -> Self {
        self.capture = capture;
        self.redact = redact;
        self
    }

    /// The same authorizer exporting every check's spans through `tracing`.
    pub fn with_tracing(mut self, tracing: Arc<Tracing>) -> Self {
        self.tracing = Some(tracing);
        self
    }

    /// Whether checks are traced (protocol adapters then pass the transport's trace context).
    pub fn tracing_on(&self) -> bool {
        self.tracing.is_some()
    }

    /// The served state.
    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// Decide on one original request, whatever protocol it came in: pin `now` and a
    /// snapshot, route, authenticate, evaluate, then count and log the decision (and, with
    /// tracing on, export its spans).
    pub async fn decide(self: &Arc<Self>, original: OriginalRequest) -> Answer {
        let Some(tracing) = &self.tracing else {
            return self.decide_traced(original, &mut None).await;
        };
        let mut trace = Some(CheckTrace::start(&original.headers, &original.trace_metadata));
        let answer = self.decide_traced(original, &mut trace).await;
        if let Some(trace) = trace {
            let evaluation = &answer.evaluation;
            let mut attributes = vec![
                KeyValue::new("sandgate.request_id", answer.request_id.clone()),
                KeyValue::new("sandgate.outcome", if evaluation.is_allow() { "allow" } else { "deny" }),
                KeyValue::new("sandgate.reason", evaluation.reason().to_owned()),
                KeyValue::new("http.response.status_code", i64::from(answer.status())),
            ];
            if let Some((policy, digest, snapshot)) = &trace.policy {
                attributes.push(KeyValue::new("sandgate.policy", policy.clone()));
                attributes.push(KeyValue::new("sandgate.policy_digest", digest.clone()));
                attributes.push(KeyValue::new("sandgate.snapshot", *snapshot as i64));
            }
            tracing.record(&trace, Instant::now(), attributes, !evaluation.is_allow());
        }
        answer
    }

    /// [`Authorizer::decide`], noting in `trace` (when tracing) what its spans need.
    async fn decide_traced(self: &Arc<Self>, mut original: OriginalRequest, trace: &mut Option<CheckTrace>) -> Answer {
        let started = Instant::now();
        let now = unix_now();
        // Sandgate's own id names the check everywhere; the client's, which anyone can send,
        // is only logged beside it.
        let request_id = self.new_request_id();
        // Cut to its bound only when written, where a token the cut would split is known.
        original.client_request_id = original.header("x-request-id").map(str::to_owned);

        let mut snapshot = self.state.store.load();
        // Fail closed on a state that may have missed revocations.
        if self.state.fleet.as_ref().is_some_and(|f| f.deny_checks()) {
            let answer = Answer::host_deny(request_id, 503, "stale_state", "the sidecar has lost touch with its fleet");
            self.record(&original, &answer, None, &snapshot, None, now, started);
            return answer;
        }
        match canonical_path(&original.path) {
            Ok(path) => original.path = path,
            Err(why) => {
                let answer = Answer::host_deny(request_id, 400, "ambiguous_path", &why.to_string());
                self.record(&original, &answer, None, &snapshot, None, now, started);
                return answer;
            }
        }
        if let Some((reason, message)) = misleading_header(&original, &self.identity_headers) {
            let answer = Answer::host_deny(request_id, 400, reason, &message);
            self.record(&original, &answer, None, &snapshot, None, now, started);
            return answer;
        }
        let Some((policy_id, _)) = snapshot.route(&original.host, &original.path) else {
            let answer = Answer::host_deny(request_id, 403, "no_route", "no route matches this request");
            self.record(&original, &answer, None, &snapshot, None, now, started);
            return answer;
        };
        let policy_id = policy_id.to_owned();
        let credential = match original.bearer() {
            Bearer::None => Credential::None,
            Bearer::Malformed => Credential::Rejected(CredentialError {
                reason: "malformed_authorization".into(),
                message: "the Authorization header is not `Bearer <token>`".into(),
            }),
            Bearer::Token(token) => {
                let traced = trace.as_mut().map(|_| (Instant::now(), self.cache_state(token, &snapshot, now)));
                let (credential, pinned, jwks_wait) = self.authenticate(token, snapshot, now).await;
                snapshot = pinned;
                if let (Some(trace), Some((start, cache))) = (trace.as_mut(), traced) {
                    trace.authenticate = Some(AuthTrace { start, end: Instant::now(), cache, jwks_wait });
                }
                credential
            }
        };
        // The policy comes from the snapshot the credential was verified against.
        let Some((_, policy)) = snapshot.route(&original.host, &original.path) else {
            let answer = Answer::host_deny(request_id, 403, "no_route", "no route matches this request");
            self.record(&original, &answer, Some(&policy_id), &snapshot, None, now, started);
            return answer;
        };
        let policy = policy.clone();
        let check = Arc::new(CheckRequest {
            request_id: request_id.clone(),
            method: original.method.clone(),
            scheme: original.scheme.clone(),
            host: original.host.clone(),
            path: original.path.clone(),
            query: original.query.clone(),
            // The log line needs only method, host and path: move the rest.
            headers: std::mem::take(&mut original.headers),
            // Envoy may send no source address: unknown, not an empty one.
            peer: Some(std::mem::take(&mut original.peer)).filter(|peer| !peer.is_empty()),
            body: original.body.take(),
            credential,
            now,
            versions: snapshot.versions(&policy),
        });
        // The tokens given to `verify-jwt` are kept out of the record; with `capture = "input"`,
        // its answers are kept for it.
        let recording = (self.capture != Capture::None || policy.shadow.is_some())
            .then(|| Arc::new(Recording::new(snapshot.clone(), self.capture == Capture::Input)));
        let verifier: Arc<dyn TokenVerifier> = match &recording {
            Some(recording) => recording.clone(),
            None => snapshot.clone(),
        };
        let context = EvalContext { data: policy.data.clone(), verifier: Some(verifier), start: Start::Auto };
        let evaluating = trace.as_ref().map(|_| Instant::now());
        let evaluation = self.evaluate(&policy, &check, context).await;
        if let (Some(trace), Some(start)) = (trace.as_mut(), evaluating) {
            let timings = evaluation.timings;
            trace.evaluate =
                Some(EvalTrace { start, end: Instant::now(), instantiate: timings.instantiate, call: timings.call });
            trace.policy = Some((policy.id.clone(), policy.module.digest().to_owned(), snapshot.version));
        }
        if evaluation.queued {
            self.state.metrics.queue_waits.inc();
        }
        let (verify_jwt, verified_tokens) = recording.map(|r| r.answers()).unwrap_or_default();
        if let Some(candidate) = &policy.shadow {
            let verifier = Arc::new(Recording::new(snapshot.clone(), false));
            let context =
                EvalContext { data: policy.data.clone(), verifier: Some(verifier.clone()), start: Start::Auto };
            let shadow = Shadow { candidate: candidate.clone(), policy: policy.id.clone(), context, verifier };
            self.shadow_evaluate(shadow, check.clone(), &evaluation, verified_tokens.clone());
        }
        let identity = if evaluation.is_allow() { self.identity_headers(&check.credential) } else { Vec::new() };
        let unset_identity = self
            .identity_headers
            .keys()
            .filter(|name| evaluation.is_allow() && !identity.iter().any(|(n, _)| n == *name))
            .cloned()
            .collect();
        let answer = Answer { request_id, evaluation, identity, unset_identity };
        let checked = Checked { policy: &policy, check: &check, verify_jwt, verified_tokens };
        self.record(&original, &answer, Some(&policy.id), &snapshot, Some(checked), now, started);
        answer
    }

    /// Answer a request the protocol adapter could not read (`status`, 400 or 431, with
    /// `reason`), counted and logged like any decision.
    pub fn refuse(&self, status: u16, reason: &str, message: &str) -> Answer {
        let started = Instant::now();
        let now = unix_now();
        let request_id = self.new_request_id();
        let answer = Answer::host_deny(request_id, status, reason, message);
        self.record(&OriginalRequest::default(), &answer, None, &self.state.store.load(), None, now, started);
        answer
    }

    fn new_request_id(&self) -> String {
        format!("{}-{}", self.id_prefix, self.request_ids.fetch_add(1, Ordering::Relaxed))
    }

    async fn evaluate(&self, policy: &LoadedPolicy, check: &Arc<CheckRequest>, context: EvalContext) -> Evaluation {
        #[cfg(feature = "bench-internals")]
        if let Some(native) = &self.native {
            let decision = native(check, &policy.data);
            return Evaluation::decided(decision);
        }
        self.state.runtime.check(&policy.module, check.clone(), context).await
    }

    /// Verify a bearer token against `snapshot` at `now`, through the verified-token cache:
    /// the signature check is skipped for a token verified before under the same key-set
    /// version, not past its `exp`, and whose issuer's fetched keys are not stale; revocation
    /// is checked every time.
    pub fn verify_token(&self, token: &str, snapshot: &Snapshot, now: u64) -> Result<VerifiedToken, Rejection> {
        let keys = &snapshot.keys;
        let cached = self.token_cache.as_ref().map(|cache| (cache, TokenCache::key(token, keys.version)));
        let hit = cached.as_ref().and_then(|(cache, key)| cache.get(key, now)).filter(|v| keys.still_valid(v, now));
        let verified = match hit {
            Some(verified) => verified,
            None => {
                let verified = keys.verify_signature(token)?;
                if let Some((cache, key)) = cached {
                    cache.insert(key, now, &verified);
                }
                verified
            }
        };
        check_revocation(&verified, &snapshot.revocations)?;
        Ok(verified)
    }

    /// The verified-token cache; `None` when it is off.
    pub fn token_cache(&self) -> Option<&TokenCache> {
        self.token_cache.as_ref()
    }

    /// Whether verifying `token` now skips its signature check (`hit`: cached, and the cached
    /// entry is still good, as [`Authorizer::verify_token`] decides), or not (`miss`, `off`):
    /// for a span.
    fn cache_state(&self, token: &str, snapshot: &Snapshot, now: u64) -> &'static str {
        let still_good = |v: VerifiedToken| snapshot.keys.still_valid(&v, now);
        match &self.token_cache {
            None => "off",
            Some(cache) if cache.get(&TokenCache::key(token, snapshot.keys.version), now).is_some_and(still_good) => {
                "hit"
            }
            Some(_) => "miss",
        }
    }

    /// Verify a bearer token against `snapshot`; on an unknown `kid` of an issuer with a JWKS
    /// endpoint, fetch (single flight) and verify again against the snapshot that fetch
    /// published. Returns the credential, the snapshot it was decided on, and whether it waited
    /// for a fetch.
    async fn authenticate(&self, token: &str, snapshot: Arc<Snapshot>, now: u64) -> (Credential, Arc<Snapshot>, bool) {
        let as_credential = |result: Result<VerifiedToken, Rejection>| match result {
            Ok(verified) => Credential::Verified(credential::verified(verified)),
            Err(rejection) => Credential::Rejected(credential::rejected(&rejection)),
        };
        match self.verify_token(token, &snapshot, now) {
            Err(Rejection::UnknownKid { issuer, kid }) => {
                // A check never waits long on a fetch: a token with a made-up kid must not be
                // able to hold it past a proxy's timeout.
                let resolve = self.state.fetcher.resolve_unknown_kid(&issuer, &kid);
                if !tokio::time::timeout(UNKNOWN_KID_WAIT, resolve).await.unwrap_or(false) {
                    return (as_credential(Err(Rejection::UnknownKid { issuer, kid })), snapshot, true);
                }
                let snapshot = self.state.store.load();
                (as_credential(self.verify_token(token, &snapshot, now)), snapshot, true)
            }
            result => (as_credential(result), snapshot, false),
        }
    }

    /// Evaluate a shadow candidate on the same request, after the answer and off its path:
    /// the candidate never affects it. Disagreements are counted and logged, without the
    /// check's tokens (the bearer token, and those either policy passed to `verify-jwt`): an
    /// outcome names the answer's headers and message.
    fn shadow_evaluate(&self, shadow: Shadow, check: Arc<CheckRequest>, primary: &Evaluation, verified: Vec<String>) {
        let primary = spec::outcome(&primary.decision);
        let state = self.state.clone();
        let log = self.log.clone();
        self.tasks.spawn(async move {
            let Shadow { candidate, policy, context, verifier } = shadow;
            // Only on a free instance: a shadow must never make a live check wait.
            let Some(evaluation) = state.runtime.try_check(&candidate, check.clone(), context).await else {
                state.metrics.shadow.get_or_create(&ShadowLabels { policy, result: "skipped" }).inc();
                return;
            };
            let outcome = spec::outcome(&evaluation.decision);
            let agree = outcome == primary;
            let result = if agree { "agree" } else { "disagree" };
            state.metrics.shadow.get_or_create(&ShadowLabels { policy: policy.clone(), result }).inc();
            if !agree {
                let (_, candidate_tokens) = verifier.answers();
                let mut secrets: Vec<&str> = bearer_secret(&check.headers).into_iter().collect();
                secrets.extend(verified.iter().chain(&candidate_tokens).map(String::as_str));
                log.write_json(
                    &secrets,
                    &serde_json::json!({
                        "v": sandgate_records::FORMAT_VERSION,
                        "shadow_disagreement": true,
                        "request_id": check.request_id,
                        "policy": policy,
                        "candidate_digest": candidate.digest(),
                        "primary": primary.to_string(),
                        "candidate": outcome.to_string(),
                    }),
                );
            }
        });
    }

    /// Count the decision and write its decision-log line.
    #[expect(clippy::too_many_arguments, reason = "one call site per outcome, each naming what it knows")]
    fn record(
        &self,
        original: &OriginalRequest,
        answer: &Answer,
        policy_id: Option<&str>,
        snapshot: &Snapshot,
        checked: Option<Checked<'_>>,
        now: u64,
        started: Instant,
    ) {
        let evaluation = &answer.evaluation;
        let latency = started.elapsed();
        let outcome = if evaluation.is_allow() { "allow" } else { "deny" };
        let metrics = &self.state.metrics;
        let reason = self.reason_label(evaluation.reason());
        metrics.decisions.get_or_create(&DecisionLabels { outcome, reason }).inc();
        metrics.latency.observe(latency.as_secs_f64());
        if self.capture == Capture::None {
            return;
        }
        // The bearer token, and every token the policy passed to `verify-jwt`, if shaped like a
        // JWT, is kept out of the record wherever it appears: the path, a query string, another
        // header, the body, the policy's log lines or its answer, a fault. The line is searched
        // only if a token is in one of the strings it is written from (almost never): a string
        // shorter than the token cannot hold it.
        let fault = evaluation.fault.as_ref().map(ToString::to_string);
        let (headers, query) = match &checked {
            Some(c) => (&c.check.headers, &c.check.query),
            None => (&original.headers, &original.query),
        };
        let mut secrets: Vec<&str> = bearer_secret(headers).into_iter().collect();
        if let Some(c) = &checked {
            secrets.extend(c.verified_tokens.iter().map(String::as_str));
        }
        secrets.retain(|s| crate::decision_log::is_secret(s));
        // A forwarded body is written as base64: its tokens are replaced before it is encoded.
        let mut scrubbed_body = None;
        // A log line cut at its bound may end in part of a token, which a search for the whole
        // token does not find.
        let mut cut_logs = None;
        if !secrets.is_empty() {
            cut_logs = logs_clear_of(&evaluation.logs, &secrets);
            let holds_one = |text: &str| secrets.iter().any(|s| text.len() >= s.len() && text.contains(s));
            let texts = [&original.method, &original.host, &original.path].into_iter().map(String::as_str);
            let texts = texts.chain(original.client_request_id.as_deref()).chain(query.as_deref());
            let texts = texts.chain(headers.iter().filter(|h| h.name != "authorization").map(|h| h.value.as_str()));
            let texts = texts.chain(evaluation.logs.iter().map(|l| l.message.as_str())).chain(fault.as_deref());
            let texts = texts.chain(decision_texts(&evaluation.decision));
            // The claims the record carries: a token may sit inside one (an `id_token` claim a
            // policy verified), and a rejection's message.
            let mut texts =
                texts.chain(checked.iter().flat_map(|c| credential_texts(&c.check.credential, &c.verify_jwt)));
            let body =
                checked.as_ref().and_then(|c| c.check.body.as_deref()).filter(|_| self.capture == Capture::Input);
            scrubbed_body = body.and_then(|body| crate::decision_log::scrubbed(body, &secrets, false));
            if scrubbed_body.is_none() && cut_logs.is_none() && !texts.any(holds_one) {
                secrets.clear();
            }
        }
        let (input, decision, route) = match &checked {
            Some(c) if self.capture == Capture::Input => {
                if let Some(archive) = &self.state.archive {
                    archive.keep(c.policy.data.digest(), || c.policy.data.text().as_bytes().to_vec());
                }
                let mut input = sandgate_records::InputView::new(c.check, &self.redact, &c.verify_jwt);
                if let Some(body) = &scrubbed_body {
                    input = input.with_body(body);
                }
                let route = snapshot.route_label(&original.host, &original.path);
                (Some(input), Some(sandgate_records::DecisionView(&evaluation.decision)), route)
            }
            _ => (None, None, None),
        };
        let checked = checked.as_ref().map(|c| (c.policy, c.check));
        let credential = checked.map(|(_, c)| match &c.credential {
            Credential::None => "none",
            Credential::Verified(_) => "verified",
            Credential::Rejected(e) => e.reason.as_str(),
        });
        self.log.write_scrubbed(
            &secrets,
            &DecisionLogEntry {
                v: sandgate_records::FORMAT_VERSION,
                ts: now,
                request_id: &answer.request_id,
                client_request_id: original.client_request_id.as_deref().map(|id| bounded_clear(id, 128, &secrets)),
                method: bounded_clear(&original.method, SUMMARY_BOUNDS.0, &secrets),
                host: bounded_clear(&original.host, SUMMARY_BOUNDS.1, &secrets),
                path: bounded_clear(&original.path, SUMMARY_BOUNDS.2, &secrets),
                policy: policy_id,
                policy_digest: checked.map(|(p, _)| p.module.digest()),
                policy_source: checked.and_then(|(p, _)| p.source.as_deref()).map(|s| s.pinned.as_str()),
                snapshot: snapshot.version,
                key_set: snapshot.keys.version,
                revocations: snapshot.revocations.version,
                fleet_revision: snapshot.fleet_revision,
                data: checked.map(|(p, _)| p.data.version),
                data_digest: checked.map(|(p, _)| p.data.digest()),
                prepared: evaluation.prepared,
                credential,
                subject: checked.and_then(|(_, c)| match &c.credential {
                    Credential::Verified(v) => Some(v.claims.subject.as_str()),
                    _ => None,
                }),
                outcome,
                status: answer.status(),
                reason: evaluation.reason(),
                fault,
                policy_logs: cut_logs.as_deref().unwrap_or(&evaluation.logs),
                latency_us: latency.as_micros() as u64,
                route,
                input,
                decision,
            },
        );
    }

    /// The metrics label for a reason code: policies choose their own codes, so past
    /// [`MAX_REASON_LABELS`] distinct ones, new codes are counted as `other`.
    fn reason_label(&self, reason: &str) -> String {
        let known = self.reason_labels.read().unwrap_or_else(|e| e.into_inner()).contains(reason);
        if known {
            return reason.to_owned();
        }
        let mut labels = self.reason_labels.write().unwrap_or_else(|e| e.into_inner());
        if labels.len() < MAX_REASON_LABELS {
            labels.insert(reason.to_owned());
            return reason.to_owned();
        }
        "other".to_owned()
    }

    /// The configured identity headers for a verified credential.
    fn identity_headers(&self, credential: &Credential) -> Vec<(String, String)> {
        let mut headers = Vec::new();
        let Credential::Verified(verified) = credential else { return headers };
        if self.identity_headers.is_empty() {
            return headers;
        }
        let Ok(claims) = serde_json::from_str::<serde_json::Map<String, Value>>(&verified.claims_json) else {
            return headers;
        };
        for (header, claim) in &self.identity_headers {
            let value = match claims.get(claim) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" "),
                Some(Value::Number(n)) => n.to_string(),
                Some(Value::Bool(b)) => b.to_string(),
                _ => continue,
            };
            if sandgate_runtime::contract::is_header_value(&value) {
                headers.push((header.clone(), value));
            }
        }
        headers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, path: &str, query: Option<&str>, headers: &[(&str, &str)]) -> OriginalRequest {
        OriginalRequest {
            method: method.into(),
            path: path.into(),
            query: query.map(Into::into),
            headers: headers.iter().map(|(n, v)| Header { name: (*n).into(), value: (*v).into() }).collect(),
            ..Default::default()
        }
    }

    fn reason(method: &str, path: &str, query: Option<&str>, headers: &[(&str, &str)]) -> Option<&'static str> {
        let identity = BTreeMap::from([("X-Auth-Subject".to_owned(), "sub".to_owned())]);
        misleading_header(&request(method, path, query, headers), &identity).map(|(reason, _)| reason)
    }

    /// Each header an upstream may read as another request than the one judged is refused,
    /// however it is spelled; the same header naming the request itself is not.
    #[test]
    fn headers_that_name_another_request_are_refused() {
        assert_eq!(reason("POST", "/a", None, &[("x-http-method-override", "DELETE")]), Some("method_override"));
        assert_eq!(reason("POST", "/a", None, &[("x_http_method_override", "DELETE")]), Some("method_override"));
        assert_eq!(reason("POST", "/a", None, &[("x-http-method-override", "post")]), None);
        assert_eq!(reason("GET", "/public", None, &[("x-original-url", "/admin")]), Some("url_override"));
        assert_eq!(reason("GET", "/public", None, &[("x_rewrite_url", "/admin")]), Some("url_override"));
        assert_eq!(reason("GET", "/public", Some("a=1"), &[("x-original-url", "/public?a=1")]), None);
        assert_eq!(reason("GET", "/public", Some("a=1"), &[("x-original-url", "/public?a=2")]), Some("url_override"));
        assert_eq!(reason("GET", "/a", None, &[("x_auth_subject", "admin")]), Some("ambiguous_identity"));
        assert_eq!(reason("GET", "/a", None, &[("x-auth-subject", "admin")]), None);
        assert_eq!(reason("GET", "/a", None, &[("x_other_header", "1")]), None);
        assert_eq!(
            reason("GET", "/a", None, &[("authorization", "Bearer a.b.c,Bearer d.e.f")]),
            Some("ambiguous_authorization")
        );
        assert_eq!(reason("GET", "/a", None, &[("authorization", "Bearer a.b.c")]), None);
    }
}
