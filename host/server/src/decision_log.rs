//! The decision log: one JSON object a line, by default on stdout, each naming everything
//! needed to explain its decision (request id, route, policy digest, snapshot versions,
//! outcome, reason, latency).
//!
//! A check never waits for the log. Lines go into a queue bounded in bytes that one thread
//! writes out; when the reader stops reading (a blocking container log driver, a paused pipe) the
//! queue fills and further lines are dropped and counted
//! (`sandgate_decision_log_dropped_total`) instead of stalling checks and health probes. Lines
//! the sink fails to write are counted there too.

use prometheus_client::metrics::counter::Counter;
use sandgate_runtime::PolicyLog;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Bytes of unwritten lines the queue holds before new lines are dropped.
pub const QUEUE_BYTES: usize = 4 << 20;
/// The writer wakes this often to write what is queued; lines reach the sink this late at most
/// (unless the reader is slow). Waking it for every line would cost every check a thread
/// switch on a busy machine.
const WRITE_EVERY: Duration = Duration::from_millis(10);
/// Queued bytes at which a check wakes the writer early, so a burst does not fill the queue.
const WAKE_AT: usize = 256 << 10;

/// One line of the decision log: everything needed to explain the decision. Its format is
/// `sandgate_records::format` (version [`sandgate_records::FORMAT_VERSION`]). The log writes it
/// with [`DecisionLogEntry::write_json`]; its `Serialize` impl is the reference that writer is
/// held to.
#[derive(serde::Serialize)]
pub(crate) struct DecisionLogEntry<'a> {
    pub(crate) v: u32,
    pub(crate) ts: u64,
    pub(crate) request_id: &'a str,
    /// The `x-request-id` the client sent, if any (bounded), kept apart from Sandgate's own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) client_request_id: Option<&'a str>,
    pub(crate) method: &'a str,
    pub(crate) host: &'a str,
    pub(crate) path: &'a str,
    pub(crate) policy: Option<&'a str>,
    pub(crate) policy_digest: Option<&'a str>,
    /// The OCI artifact the policy was pulled from, pinned by its manifest digest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) policy_source: Option<&'a str>,
    pub(crate) snapshot: u64,
    pub(crate) key_set: u64,
    pub(crate) revocations: u64,
    /// In a fleet: the bucket revision the snapshot is exactly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) fleet_revision: Option<u64>,
    pub(crate) data: Option<u64>,
    /// `sha256:…` of the data document's JSON text, when a policy ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) data_digest: Option<&'a str>,
    /// The check started from the policy's memory prepared for its data (`prepare`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) prepared: bool,
    /// `none`, `verified`, or the reason the credential was rejected.
    pub(crate) credential: Option<&'a str>,
    pub(crate) subject: Option<&'a str>,
    pub(crate) outcome: &'static str,
    pub(crate) status: u16,
    pub(crate) reason: &'a str,
    pub(crate) fault: Option<String>,
    pub(crate) policy_logs: &'a [PolicyLog],
    pub(crate) latency_us: u64,
    /// The route that chose the policy (`capture = "input"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) route: Option<std::borrow::Cow<'a, str>>,
    /// The check as the policy saw it (`capture = "input"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) input: Option<sandgate_records::InputView<'a>>,
    /// The policy's whole answer (`capture = "input"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) decision: Option<sandgate_records::DecisionView<'a>>,
}

impl DecisionLogEntry<'_> {
    /// Append the entry's JSON to `out`: the same bytes its `Serialize` impl writes through
    /// `serde_json` (a test holds them to it), written directly
    /// ([`sandgate_records::line`]): every recorded check writes one.
    pub(crate) fn write_json(&self, out: &mut Vec<u8>) {
        let mut o = sandgate_records::line::Object::new(out);
        o.u64("v", u64::from(self.v));
        o.u64("ts", self.ts);
        o.str("request_id", self.request_id);
        o.some_str("client_request_id", self.client_request_id);
        o.str("method", self.method);
        o.str("host", self.host);
        o.str("path", self.path);
        o.opt_str("policy", self.policy);
        o.opt_str("policy_digest", self.policy_digest);
        o.some_str("policy_source", self.policy_source);
        o.u64("snapshot", self.snapshot);
        o.u64("key_set", self.key_set);
        o.u64("revocations", self.revocations);
        o.some_u64("fleet_revision", self.fleet_revision);
        o.opt_u64("data", self.data);
        o.some_str("data_digest", self.data_digest);
        if self.prepared {
            o.bool("prepared", true);
        }
        o.opt_str("credential", self.credential);
        o.opt_str("subject", self.subject);
        o.str("outcome", self.outcome);
        o.u64("status", u64::from(self.status));
        o.str("reason", self.reason);
        o.opt_str("fault", self.fault.as_deref());
        sandgate_records::line::array(o.key("policy_logs"), self.policy_logs, |out, log| {
            let mut l = sandgate_records::line::Object::new(out);
            l.str("level", log.level);
            l.str("message", &log.message);
            l.end();
        });
        o.u64("latency_us", self.latency_us);
        o.some_str("route", self.route.as_deref());
        if let Some(input) = &self.input {
            input.write_json(o.key("input"));
        }
        if let Some(decision) = &self.decision {
            decision.write_json(o.key("decision"));
        }
        o.end();
    }
}

/// Where checks hand their lines: cheap to clone, never blocks on the sink.
#[derive(Clone)]
pub struct DecisionLog {
    shared: Arc<Shared>,
    dropped: Counter,
}

/// Lines waiting for the writer, bounded in bytes. Checks append under a short lock (a copy);
/// the writer wakes every [`WRITE_EVERY`] (or when [`WAKE_AT`] bytes are queued) and takes
/// everything queued at once.
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    capacity: usize,
}

struct Queue {
    bytes: Vec<u8>,
    closing: bool,
}

impl DecisionLog {
    /// A log written to `sink` by its own thread, holding at most `capacity` bytes of unwritten
    /// lines and counting the lines it drops in `dropped`.
    pub fn start(
        sink: Box<dyn Write + Send>,
        capacity: usize,
        dropped: Counter,
    ) -> std::io::Result<(DecisionLog, LogWriter)> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { bytes: Vec::new(), closing: false }),
            ready: Condvar::new(),
            capacity: capacity.max(1),
        });
        let (writer, lost) = (shared.clone(), dropped.clone());
        let thread =
            std::thread::Builder::new().name("sandgate-log".into()).spawn(move || write_lines(&writer, sink, &lost))?;
        Ok((DecisionLog { shared: shared.clone(), dropped }, LogWriter { shared, thread: Some(thread) }))
    }

    /// Write `entry` with every occurrence of each of `secrets` (the tokens verified for its
    /// check) replaced by `[redacted]`.
    pub(crate) fn write_scrubbed(&self, secrets: &[&str], entry: &DecisionLogEntry<'_>) {
        self.send(|line| {
            entry.write_json(line);
            scrub(line, secrets);
            Ok(())
        });
    }

    /// Write `value`, with `secrets` replaced as [`DecisionLog::write_scrubbed`] does.
    pub(crate) fn write_json(&self, secrets: &[&str], value: &serde_json::Value) {
        self.send(|line| {
            serde_json::to_writer(&mut *line, value)?;
            scrub(line, secrets);
            Ok(())
        });
    }

    fn send(&self, serialize: impl FnOnce(&mut Vec<u8>) -> serde_json::Result<()>) {
        thread_local! {
            static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        LINE.with_borrow_mut(|line| {
            line.clear();
            if serialize(line).is_err() {
                return;
            }
            line.push(b'\n');
            let mut queue = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            if queue.bytes.len() + line.len() > self.shared.capacity {
                drop(queue);
                self.dropped.inc();
                return;
            }
            let below = queue.bytes.len() < WAKE_AT;
            queue.bytes.extend_from_slice(line);
            let wake = below && queue.bytes.len() >= WAKE_AT;
            drop(queue);
            if wake {
                self.shared.ready.notify_one();
            }
        });
    }
}

/// Shorter strings are not treated as secrets: they could match unrelated text.
const MIN_SECRET: usize = 16;

/// Whether `token` is looked for in records: a JWT in compact form, three non-empty base64url
/// parts. Sandgate verifies nothing else, and a client choosing its bearer value can make only
/// such text (never a path, a key or a number) disappear from its own record.
pub(crate) fn is_secret(token: &str) -> bool {
    // Every recorded check with a bearer token asks this of a token of a few hundred bytes:
    // one pass over the bytes with no branch on them (the compiler compares many at once),
    // then the dots found with `memchr`.
    let bytes = token.as_bytes();
    if bytes.len() < MIN_SECRET {
        return false;
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.';
    if bytes.iter().fold(false, |outside, &b| outside | !allowed(b)) {
        return false;
    }
    let mut dots = memchr::memchr_iter(b'.', bytes);
    match (dots.next(), dots.next(), dots.next()) {
        (Some(first), Some(second), None) => first > 0 && second > first + 1 && second + 1 < bytes.len(),
        _ => false,
    }
}

/// Replace every occurrence of each secret in the JSON `line` by [`sandgate_records::REDACTED`].
fn scrub(line: &mut Vec<u8>, secrets: &[&str]) {
    if let Some(scrubbed) = scrubbed(line, secrets, true) {
        *line = scrubbed;
    }
}

/// `bytes` with every occurrence of each secret ([`is_secret`]) replaced by
/// [`sandgate_records::REDACTED`], or `None` if it holds none. A secret's characters are written
/// by JSON as they are, so it appears in a JSON line exactly as in its source string; in `json`,
/// an occurrence starting inside an escape sequence (the `t` of `\t`, the digits of `\u001f`)
/// is not one, and replacing it would break the line.
pub(crate) fn scrubbed(bytes: &[u8], secrets: &[&str], json: bool) -> Option<Vec<u8>> {
    let mut scrubbed: Option<Vec<u8>> = None;
    for secret in secrets.iter().filter(|s| is_secret(s)) {
        let text = scrubbed.as_deref().unwrap_or(bytes);
        let finder = memchr::memmem::Finder::new(secret.as_bytes());
        let (mut out, mut copied, mut from) = (None::<Vec<u8>>, 0, 0);
        while let Some(found) = finder.find(&text[from..]).map(|at| at + from) {
            from = found + 1;
            if json && in_escape(text, found) {
                continue;
            }
            let out = out.get_or_insert_with(|| Vec::with_capacity(text.len()));
            out.extend_from_slice(&text[copied..found]);
            out.extend_from_slice(sandgate_records::REDACTED.as_bytes());
            copied = found + secret.len();
            from = copied;
        }
        if let Some(mut out) = out {
            out.extend_from_slice(&text[copied..]);
            scrubbed = Some(out);
        }
    }
    scrubbed
}

/// Whether `line[at]` is part of a JSON escape sequence after its backslash: the letter of
/// `\n`, `\t`, `\u`…, or one of the four digits of `\uXXXX`.
fn in_escape(line: &[u8], at: usize) -> bool {
    let escaping = |at: usize| line[..at].iter().rev().take_while(|&&b| b == b'\\').count() % 2 == 1;
    escaping(at) || (1..=4.min(at)).any(|back| line[at - back] == b'u' && escaping(at - back))
}

fn write_lines(shared: &Shared, mut sink: Box<dyn Write + Send>, dropped: &Counter) {
    let mut batch = Vec::new();
    let mut failing = false;
    loop {
        {
            let mut queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            if queue.bytes.is_empty() && !queue.closing {
                queue = shared.ready.wait_timeout(queue, WRITE_EVERY).unwrap_or_else(|e| e.into_inner()).0;
            }
            if queue.bytes.is_empty() {
                if queue.closing {
                    break; // everything is written
                }
                drop(queue);
                // Idle: the sink does what is due (the NATS spool syncs what waits, and reports
                // its own errors).
                let _ = sink.flush();
                continue;
            }
            std::mem::swap(&mut batch, &mut queue.bytes);
        }
        // A closed sink must not stop authorization: a write error drops the batch, counted
        // like every other line not kept, and reported once until a write succeeds again.
        match sink.write_all(&batch) {
            Ok(()) => failing = false,
            Err(e) => {
                dropped.inc_by(memchr::memchr_iter(b'\n', &batch).count() as u64);
                if !failing {
                    tracing::error!(error = %e, "cannot write decision records; they are dropped and counted");
                }
                failing = true;
            }
        }
        batch.clear();
    }
    let _ = sink.flush();
}

/// The log's writer thread: [`LogWriter::finish`] lets it write out what is queued.
pub struct LogWriter {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LogWriter {
    /// Stop once the queue is written out, waiting at most `grace` (a reader that never reads
    /// again must not keep the process alive).
    pub async fn finish(mut self, grace: Duration) {
        self.shared.queue.lock().unwrap_or_else(|e| e.into_inner()).closing = true;
        self.shared.ready.notify_one();
        if let Some(thread) = self.thread.take() {
            let joined = tokio::task::spawn_blocking(move || thread.join());
            if tokio::time::timeout(grace, joined).await.is_err() {
                tracing::warn!("the decision log's reader is not reading; unwritten lines are lost");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_occurrence_of_a_secret_is_redacted_and_the_line_stays_json() {
        let token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl";
        let mut line = serde_json::to_vec(&serde_json::json!({
            "query": format!("access_token={token}&x=1"),
            "log": [format!("got {token}"), "other"],
            "short": "abc",
        }))
        .unwrap();
        scrub(&mut line, &[token, "abc", "has a \" quote and is long"]);
        let text = String::from_utf8(line).unwrap();
        assert!(!text.contains(token), "{text}");
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["query"], "access_token=[redacted]&x=1");
        assert_eq!(value["log"][0], "got [redacted]");
        // Too short to be a token: left as it is.
        assert_eq!(value["short"], "abc");
    }

    /// A client choosing its bearer value chooses what is searched for: an occurrence inside a
    /// JSON escape (`\t`, `\u001f`) is no occurrence of the token, and replacing it would make
    /// the line unreadable; one after a literal backslash (`\\`) is, and is replaced.
    #[test]
    fn an_occurrence_inside_an_escape_sequence_is_left_and_the_line_stays_json() {
        let chosen = "tAAAAAAAAAAAAAAA.BBBB.CCCC";
        let digits = "001fAAAAAAAAAAAA.BBBB.CCCC";
        let token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl";
        let mut line = serde_json::to_vec(&serde_json::json!({
            "request_id": "x\tAAAAAAAAAAAAAAA.BBBB.CCCC",
            "path": "/\u{1f}AAAAAAAAAAAA.BBBB.CCCC",
            "header": format!("\\{token}"),
        }))
        .unwrap();
        scrub(&mut line, &[chosen, digits, token]);
        let value: serde_json::Value = serde_json::from_slice(&line).expect("the line is still JSON");
        assert_eq!(value["request_id"], "x\tAAAAAAAAAAAAAAA.BBBB.CCCC");
        assert_eq!(value["path"], "/\u{1f}AAAAAAAAAAAA.BBBB.CCCC");
        assert_eq!(value["header"], "\\[redacted]");
    }

    /// Only a JWT's shape is a secret: a client's bearer value that is a path, a field name or
    /// a number cannot make that text disappear from its own record.
    #[test]
    fn only_text_shaped_like_a_jwt_is_a_secret() {
        assert!(is_secret("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"));
        for chosen in [
            "/api/admin/export-all",
            "client_request_id",
            "12345678901234567890",
            "aaaaaaaaaaaa..bbbb",
            "a.b.c",
            ".aaaaaaaaaaaaaaaa.bbbb",
            "aaaaaaaaaaaaaaaa.bbbb.",
            "aaaaaaaaaaaaaaaa.bbbb.cccc.dddd",
            "aaaaaaaaaaaaaaaa.bb=b.cccc",
            "aaaaaaaaaaaaaaaa.bbbb.ccé",
        ] {
            assert!(!is_secret(chosen), "{chosen}");
        }
        let mut line = serde_json::to_vec(&serde_json::json!({ "path": "/api/admin/export-all" })).unwrap();
        scrub(&mut line, &["/api/admin/export-all"]);
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&line).unwrap()["path"], "/api/admin/export-all");
    }

    proptest::proptest! {
        /// The fast test answers as the definition reads: at least 16 bytes, three
        /// non-empty parts separated by dots, each of base64url characters alone.
        #[test]
        fn a_secret_is_exactly_three_non_empty_base64url_parts(
            parts in proptest::collection::vec(
                proptest::prop_oneof!["[a-zA-Z0-9_-]{1,12}", "[a-zA-Z0-9_=/é-]{1,12}", proptest::strategy::Just(String::new())],
                1..5,
            )
        ) {
            let token = parts.join(".");
            let base64url = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
            let defined = token.len() >= MIN_SECRET
                && parts.len() == 3
                && parts.iter().all(|p| !p.is_empty() && p.bytes().all(base64url));
            proptest::prop_assert_eq!(is_secret(&token), defined);
        }
    }

    /// Lines a sink fails to take (a full disk, a closed pipe) are counted as dropped.
    #[tokio::test]
    async fn lines_a_sink_fails_to_write_are_counted_as_dropped() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("no space left on device"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let dropped = Counter::default();
        let (log, writer) = DecisionLog::start(Box::new(Full), QUEUE_BYTES, dropped.clone()).unwrap();
        for n in 0..3 {
            log.write_json(&[], &serde_json::json!({ "n": n }));
        }
        writer.finish(Duration::from_secs(5)).await;
        assert_eq!(dropped.get(), 3);
    }

    /// A sink that never returns from `write`: a reader that stopped reading.
    struct Stalled;

    impl Write for Stalled {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            loop {
                std::thread::park();
            }
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A sink that keeps what it is given.
    #[derive(Clone, Default)]
    struct Kept(Arc<Mutex<Vec<u8>>>);

    impl Write for Kept {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn every_line_is_written_whole_and_in_order_before_finish_returns() {
        let kept = Kept::default();
        let (log, writer) = DecisionLog::start(Box::new(kept.clone()), QUEUE_BYTES, Counter::default()).unwrap();
        for i in 0..1000 {
            log.write_json(&[], &serde_json::json!({ "n": i }));
        }
        writer.finish(Duration::from_secs(5)).await;
        let text = String::from_utf8(kept.0.lock().unwrap().clone()).unwrap();
        let numbers: Vec<u64> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["n"].as_u64().unwrap())
            .collect();
        assert_eq!(numbers, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn a_stalled_reader_drops_and_counts_lines_without_blocking() {
        let dropped = Counter::default();
        // Each line is `{"line":"x"}` and a newline: 13 bytes; the queue holds four.
        let (log, _writer) = DecisionLog::start(Box::new(Stalled), 4 * 13, dropped.clone()).unwrap();
        for _ in 0..100 {
            log.write_json(&[], &serde_json::json!({ "line": "x" }));
        }
        // At most one batch is stuck in the stalled write and four lines wait in the queue;
        // every other line was dropped and counted, and no call blocked.
        assert!(dropped.get() >= 92, "dropped {}", dropped.get());
        assert!(dropped.get() <= 96, "dropped {}", dropped.get());
    }

    mod written {
        use super::super::*;
        use proptest::prelude::*;
        use sandgate_records::{DecisionView, InputView};
        use sandgate_runtime::bindings::sandgate::policy::types::{
            CheckRequest, Credential, Decision, DenyResponse, Header, SnapshotVersions,
        };

        /// Any text, escapes and non-ASCII included.
        fn text() -> impl Strategy<Value = String> {
            prop_oneof![".{0,12}", "[a-z\"\\\\\u{0}-\u{1f}é€😀]{0,8}"]
        }

        fn check(path: String, header: String) -> CheckRequest {
            CheckRequest {
                request_id: "r".into(),
                method: "GET".into(),
                scheme: "https".into(),
                host: "api.test".into(),
                path,
                query: None,
                headers: vec![Header { name: "user-agent".into(), value: header }],
                peer: None,
                body: None,
                credential: Credential::None,
                now: 7,
                versions: SnapshotVersions {
                    snapshot: 1,
                    policy_digest: "ab".into(),
                    key_set: 2,
                    revocations: 3,
                    data: 4,
                },
            }
        }

        proptest! {
            /// The decision log writes entries with `write_json`; the format is what their
            /// `Serialize` impl writes. Both must be the same JSON, byte for byte, with every
            /// optional field present or absent.
            #[test]
            fn an_entry_is_written_exactly_as_serde_json_writes_it(
                strings in proptest::collection::vec(text(), 12),
                numbers in proptest::collection::vec(any::<u64>(), 6),
                present in proptest::collection::vec(any::<bool>(), 12),
                status in any::<u16>(),
                logs in proptest::collection::vec((prop_oneof![Just("info"), Just("warn")], text()), 0..3),
            ) {
                let s = |n: usize| strings[n].as_str();
                let some = |n: usize| present[n].then(|| strings[n].as_str());
                let check = check(strings[0].clone(), strings[1].clone());
                let decision = Decision::Deny(DenyResponse {
                    status,
                    reason: strings[2].clone(),
                    message: strings[3].clone(),
                    headers: Vec::new(),
                });
                let policy_logs: Vec<PolicyLog> =
                    logs.into_iter().map(|(level, message)| PolicyLog { level, message }).collect();
                let redact = Vec::new();
                let entry = DecisionLogEntry {
                    v: 1,
                    ts: numbers[0],
                    request_id: s(4),
                    client_request_id: some(5),
                    method: s(6),
                    host: s(7),
                    path: s(8),
                    policy: some(9),
                    policy_digest: some(10),
                    policy_source: some(11),
                    snapshot: numbers[1],
                    key_set: numbers[2],
                    revocations: numbers[3],
                    fleet_revision: present[0].then_some(numbers[4]),
                    data: present[1].then_some(numbers[5]),
                    data_digest: some(2),
                    prepared: present[2],
                    credential: some(3),
                    subject: some(4),
                    outcome: if present[5] { "allow" } else { "deny" },
                    status,
                    reason: s(0),
                    fault: some(6).map(str::to_owned),
                    policy_logs: &policy_logs,
                    latency_us: numbers[0] / 3,
                    route: some(7).map(std::borrow::Cow::Borrowed),
                    input: present[8].then(|| InputView::new(&check, &redact, &[])),
                    decision: present[8].then_some(DecisionView(&decision)),
                };
                let mut written = Vec::new();
                entry.write_json(&mut written);
                let expected = serde_json::to_string(&entry).unwrap_or_default();
                prop_assert!(!expected.is_empty());
                prop_assert_eq!(String::from_utf8_lossy(&written), expected);
            }
        }
    }
}
