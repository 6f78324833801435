//! Replay: decide recorded checks again, offline, and compare.
//!
//! A record with a captured input is run on the module and data document its digests name
//! (read from one or more archives, each blob checked against its digest), in a fresh
//! instance, with the recorded `verify-jwt` answers played back in order. The answer must be
//! the recorded one, field for field. With a candidate for a policy, the candidate runs
//! instead and every answer that differs is a change it would make.

use crate::format::{
    DecisionRecord, FORMAT_VERSION, HOST_CONDITIONS, OLDEST_VERSION, REDACTED, Record, SUMMARY_BOUNDS, VerifyAnswer,
    Versions, bounded,
};
use sandgate_registry::Cache;
use sandgate_runtime::bindings::sandgate::policy::types::{
    CheckRequest, Credential, CredentialError, VerifiedCredential,
};
use sandgate_runtime::{EvalContext, PolicyData, PolicyModule, Runtime, Start, TokenVerifier};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// Largest module or data document read from an archive.
pub const MAX_BLOB: u64 = 256 << 20;

/// What replaying one record found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The same answer as recorded.
    Same,
    /// A different answer.
    Differs {
        /// What was answered then.
        recorded: DecisionRecord,
        /// What is answered now.
        replayed: DecisionRecord,
    },
    /// Not replayed, and why (a short code: see [`Report::skipped`]).
    Skipped(&'static str),
    /// Not replayed: the record's own summary (the field named) contradicts its input or its
    /// recorded answer, so it was not written as it is. Counted as a difference.
    Contradicts(&'static str),
}

/// One example of a difference, for a report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Example {
    /// The check's id.
    pub request_id: String,
    /// `METHOD host path`.
    pub request: String,
}

/// Differences of one kind: the same policy, the same answer then and now.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Change {
    /// How many records.
    pub count: u64,
    /// The first few.
    pub examples: Vec<Example>,
}

/// What replaying many records found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// Lines read.
    pub records: u64,
    /// Records decided again, or found contradicting themselves ([`Verdict::Contradicts`]).
    pub replayed: u64,
    /// Of those, answered the same.
    pub same: u64,
    /// Of those, answered differently, or contradicting themselves.
    pub differ: u64,
    /// Records not replayed, by why: `no_input` (captured without input, or decided by the
    /// host before any policy ran), `host_condition` (overload, instantiation failure),
    /// `missing_module`, `missing_data`, `bad_input`, `not_prepared` (the check started from
    /// memory prepared for its data, which this build could not prepare), `not_a_decision` (a shadow line),
    /// `other_policy` (with a candidate: a record of another policy), `unsupported_version`
    /// (a format version this build does not know), `unreadable`.
    pub skipped: BTreeMap<&'static str, u64>,
    /// Differences by `route (policy): then → now`.
    pub changes: BTreeMap<String, Change>,
}

/// Examples kept per kind of difference.
const EXAMPLES: usize = 3;

impl Report {
    /// Count `verdict` for `record`.
    pub fn add(&mut self, record: &Record, verdict: &Verdict) {
        self.records += 1;
        match verdict {
            Verdict::Same => {
                self.replayed += 1;
                self.same += 1;
            }
            Verdict::Differs { recorded, replayed } => {
                let policy = record.policy.as_deref().unwrap_or("-");
                let key = match &record.route {
                    Some(route) => format!("{route} ({policy}): {} → {}", recorded.summary(), replayed.summary()),
                    None => format!("{policy}: {} → {}", recorded.summary(), replayed.summary()),
                };
                self.differs(key, record);
            }
            Verdict::Skipped(why) => *self.skipped.entry(why).or_default() += 1,
            Verdict::Contradicts(field) => {
                self.differs(format!("the record's `{field}` contradicts its input or answer"), record);
            }
        }
    }

    /// Count `record` as replayed and different, under `change`, kept as an example while there
    /// are fewer than [`EXAMPLES`].
    fn differs(&mut self, change: String, record: &Record) {
        self.replayed += 1;
        self.differ += 1;
        let change = self.changes.entry(change).or_default();
        change.count += 1;
        if change.examples.len() < EXAMPLES {
            change.examples.push(Example {
                request_id: record.request_id.clone(),
                request: format!("{} {} {}", record.method, record.host, record.path),
            });
        }
    }

    /// Count a line that is not a record at all.
    pub fn unreadable(&mut self) {
        self.records += 1;
        *self.skipped.entry("unreadable").or_default() += 1;
    }

    /// Why this replay proves less than it seems to, if it does: nothing was replayed, or
    /// records that were meant to be replayed could not be (a module or data document no
    /// archive holds, an input that does not make a check, a line that is not a record, a
    /// format version this build does not know). Records skipped by design (no input, the
    /// host's own condition, shadow lines, other policies than a candidate's) do not count.
    pub fn incomplete(&self) -> Option<String> {
        const UNVERIFIED: [&str; 6] =
            ["missing_module", "missing_data", "bad_input", "unreadable", "unsupported_version", "not_prepared"];
        let unverified: Vec<String> =
            UNVERIFIED.iter().filter_map(|why| self.skipped.get(why).map(|n| format!("{n} {why}"))).collect();
        if self.replayed == 0 {
            Some("nothing was replayed".into())
        } else if !unverified.is_empty() {
            Some(format!("records that could not be replayed: {}", unverified.join(", ")))
        } else {
            None
        }
    }
}

/// Plays the recorded `verify-jwt` answers back, in order.
struct PlayedBack(Mutex<VecDeque<VerifyAnswer>>);

impl TokenVerifier for PlayedBack {
    fn verify(&self, _token: &str) -> Result<VerifiedCredential, CredentialError> {
        match self.0.lock().unwrap_or_else(|e| e.into_inner()).pop_front() {
            Some(VerifyAnswer::Verified(v)) => v.to_credential().map_err(|message| CredentialError {
                reason: "replay_unreadable_answer".into(),
                message: format!("the recorded verify-jwt answer does not read: {message}"),
            }),
            Some(VerifyAnswer::Rejected(e)) => Err(e.to_error()),
            None => Err(CredentialError {
                reason: "replay_unrecorded".into(),
                message: "the recorded check made fewer verify-jwt calls".into(),
            }),
        }
    }
}

/// Whether a fault with `reason` is the host's condition rather than the policy's answer:
/// [`HOST_CONDITIONS`], and a policy stopped at its (wall-clock) time budget if `timeout`.
fn host_condition(reason: &str, timeout: bool) -> bool {
    HOST_CONDITIONS.contains(&reason) || (timeout && reason == "policy_timeout")
}

/// What a [`Fetch`] is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted<'s> {
    /// A module, from where its record says it came from (`oci://…@sha256:…`,
    /// `fleet:sha256:…`).
    Module {
        /// The record's `policy_source`.
        source: &'s str,
    },
    /// A data document (a record does not say where one came from).
    Data,
}

/// Fetches a module or data document the archives lack, by digest (`sha256:…`).
pub type Fetch<'a> = Box<dyn FnMut(&str, Wanted<'_>) -> Option<Vec<u8>> + 'a>;

/// Decides recorded checks again.
pub struct Replayer<'a> {
    runtime: &'a Runtime,
    archives: Vec<Cache>,
    fetch: Option<Fetch<'a>>,
    modules: HashMap<String, Option<PolicyModule>>,
    data: HashMap<String, Option<Arc<PolicyData>>>,
    candidates: HashMap<String, PolicyModule>,
}

impl<'a> Replayer<'a> {
    /// A replayer reading modules and data from `archives`, in order.
    pub fn new(runtime: &'a Runtime, archives: Vec<Cache>) -> Self {
        Replayer {
            runtime,
            archives,
            fetch: None,
            modules: HashMap::new(),
            data: HashMap::new(),
            candidates: HashMap::new(),
        }
    }

    /// Fetch modules and data documents the archives lack with `fetch`; what it returns is used
    /// only if it has the digest asked for.
    pub fn with_fetch(mut self, fetch: Fetch<'a>) -> Self {
        self.fetch = Some(fetch);
        self
    }

    /// Run `module` instead of whatever policy `id` ran; records of other policies are skipped.
    pub fn with_candidate(mut self, id: String, module: PolicyModule) -> Self {
        self.candidates.insert(id, module);
        self
    }

    /// The blob with `digest`: from an archive, else fetched as `wanted` and used only if it has
    /// that digest. A record's digest is whatever its writer put there: only a digest is asked
    /// for.
    fn blob(&mut self, digest: &str, wanted: Option<Wanted<'_>>) -> Option<Vec<u8>> {
        if let Some(bytes) = self.archives.iter().find_map(|a| a.read_blob(digest, MAX_BLOB).ok().flatten()) {
            return Some(bytes);
        }
        let (Some(fetch), Some(wanted)) = (self.fetch.as_mut(), wanted) else { return None };
        if !sandgate_registry::valid_digest(digest) {
            return None;
        }
        fetch(digest, wanted).filter(|bytes| sandgate_registry::sha256_digest(bytes) == digest)
    }

    fn module(&mut self, hex: &str, source: Option<&str>) -> Option<PolicyModule> {
        if let Some(module) = self.modules.get(hex) {
            return module.clone();
        }
        let digest = format!("sha256:{hex}");
        let module = self.blob(&digest, source.map(|source| Wanted::Module { source })).and_then(|bytes| {
            match self.runtime.load(&bytes) {
                Ok(module) => Some(module),
                Err(e) => {
                    tracing::warn!(digest = hex, error = %e, "an archived module does not load");
                    None
                }
            }
        });
        self.modules.insert(hex.to_owned(), module.clone());
        module
    }

    fn data(&mut self, digest: &str, version: u64) -> Option<Arc<PolicyData>> {
        if let Some(data) = self.data.get(digest) {
            return data.clone();
        }
        let data = self
            .blob(digest, Some(Wanted::Data))
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .map(|value| Arc::new(PolicyData::new(value, version)));
        self.data.insert(digest.to_owned(), data.clone());
        data
    }

    /// Decide `record` again and compare.
    pub fn replay(&mut self, record: &Record) -> Verdict {
        // A shadow line carries no input and no answer: a line that does is a decision, whatever
        // else it says.
        if record.shadow_disagreement.is_some() && record.input.is_none() && record.decision.is_none() {
            return Verdict::Skipped("not_a_decision");
        }
        if !self.candidates.is_empty() && !record.policy.as_ref().is_some_and(|p| self.candidates.contains_key(p)) {
            return Verdict::Skipped("other_policy");
        }
        // Versions 1 and 2, or a line from before versions: what this build knows how to read.
        if record.v.is_some_and(|v| !(OLDEST_VERSION..=FORMAT_VERSION).contains(&v)) {
            return Verdict::Skipped("unsupported_version");
        }
        let (Some(input), Some(recorded)) = (&record.input, &record.decision) else {
            return Verdict::Skipped("no_input");
        };
        let (Some(now), Some(versions)) = (record.now(), record.versions()) else {
            return Verdict::Skipped("bad_input");
        };
        let Ok(check) = input.to_check(&record.request_id, now, &versions) else {
            return Verdict::Skipped("bad_input");
        };
        if let Some(field) = contradiction(record, &check, &versions, recorded) {
            return Verdict::Contradicts(field);
        }
        // A policy out of time answered for the sidecar's clock and load at that moment, which
        // replay does not have.
        if host_condition(&record.reason, true) && record.fault.is_some() {
            return Verdict::Skipped("host_condition");
        }
        let candidate = record.policy.as_ref().and_then(|p| self.candidates.get(p)).cloned();
        let is_candidate = candidate.is_some();
        let module = match candidate {
            Some(module) => module,
            None => match self.module(&versions.policy_digest, record.policy_source.as_deref()) {
                Some(module) => module,
                None => return Verdict::Skipped("missing_module"),
            },
        };
        let Some(data_digest) = &record.data_digest else { return Verdict::Skipped("missing_data") };
        let Some(data) = self.data(data_digest, versions.data) else { return Verdict::Skipped("missing_data") };
        let verifier = Arc::new(PlayedBack(Mutex::new(input.verify_jwt.iter().cloned().collect())));
        // The start the check had: a policy's `prepare` must not change its decisions, but
        // replay reproduces the check, not what the policy promises. A candidate starts as it
        // would once serving: prepared, if it prepares.
        let start = if record.prepared || is_candidate { Start::Prepared } else { Start::Built };
        let context = EvalContext { data, verifier: Some(verifier), start };
        let evaluation = self.runtime.evaluate(&module, &Arc::new(check), &context);
        if record.prepared && !is_candidate && !evaluation.prepared {
            return Verdict::Skipped("not_prepared");
        }
        // Out of time here: this machine's condition, unless the module is a candidate, whose
        // running out of time is what it would change.
        if evaluation.fault.as_ref().is_some_and(|f| host_condition(f.reason(), !is_candidate)) {
            return Verdict::Skipped("host_condition");
        }
        let replayed = DecisionRecord::from(&evaluation.decision);
        if &replayed == recorded { Verdict::Same } else { Verdict::Differs { recorded: recorded.clone(), replayed } }
    }
}

/// The first of `record`'s summary fields (what reports and log searches read) that is not what
/// the sidecar writes for its input (`check`, pinned to `versions`) and recorded answer, if any.
fn contradiction(
    record: &Record,
    check: &CheckRequest,
    versions: &Versions,
    recorded: &DecisionRecord,
) -> Option<&'static str> {
    let (outcome, status, reason) = match recorded {
        DecisionRecord::Allow { .. } => ("allow", 200, "allow"),
        DecisionRecord::Deny { status, reason, .. } => ("deny", *status, reason.as_str()),
    };
    let (credential, subject) = match &check.credential {
        Credential::None => ("none", None),
        Credential::Verified(v) => ("verified", Some(v.claims.subject.as_str())),
        Credential::Rejected(e) => (e.reason.as_str(), None),
    };
    let (method, host, path) = SUMMARY_BOUNDS;
    // The summary's strings are the input's, cut. Where a token was replaced in the input, the
    // cut may have fallen inside it or before it, and the two need not match.
    let cut_from = |summary: &str, input: &str, max: usize| input.contains(REDACTED) || summary == bounded(input, max);
    [
        ("outcome", record.outcome == outcome),
        ("status", record.status == status),
        ("reason", record.reason == reason),
        ("policy_digest", record.policy_digest.as_deref() == Some(versions.policy_digest.as_str())),
        ("credential", record.credential.as_deref() == Some(credential)),
        ("subject", record.subject.as_deref() == subject),
        ("method", cut_from(&record.method, &check.method, method)),
        ("host", cut_from(&record.host, &check.host, host)),
        ("path", cut_from(&record.path, &check.path, path)),
    ]
    .into_iter()
    .find_map(|(field, holds)| (!holds).then_some(field))
}
