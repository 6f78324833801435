//! A decision ready to be answered in any protocol: the evaluation, the request id and the
//! identity headers; each protocol adapter turns it into its own response.

use sandgate_runtime::Evaluation;
use sandgate_runtime::bindings::sandgate::policy::types::{Decision, DenyResponse};

/// A decision, ready to be answered in any protocol.
pub struct Answer {
    /// The check's id (the caller's `x-request-id`, or one made up).
    pub request_id: String,
    /// The decision and how it was reached.
    pub evaluation: Evaluation,
    /// Configured identity headers to add to an allow.
    pub identity: Vec<(String, String)>,
    /// Configured identity headers this allow has no value for: a proxy that can remove
    /// upstream headers (Envoy) removes them, so a client cannot supply its own.
    pub unset_identity: Vec<String>,
}

impl Answer {
    /// A deny the host decides without a policy (bad path, no route, bad input).
    pub fn host_deny(request_id: String, status: u16, reason: &str, message: &str) -> Self {
        let decision = Decision::Deny(DenyResponse {
            status,
            reason: reason.into(),
            message: message.into(),
            headers: Vec::new(),
        });
        let evaluation = Evaluation::decided(decision);
        Answer { request_id, evaluation, identity: Vec::new(), unset_identity: Vec::new() }
    }

    /// The HTTP status this decision answers: 200 for an allow.
    pub fn status(&self) -> u16 {
        match &self.evaluation.decision {
            Decision::Allow(_) => 200,
            Decision::Deny(d) => d.status,
        }
    }

    /// Headers of the answer: for an allow, the upstream headers (the policy's, then the
    /// identity headers); for a deny, the response headers, with `www-authenticate` on a 401
    /// and `x-sandgate-reason`. Always `x-sandgate-request-id`.
    pub fn headers(&self) -> Vec<(&str, &str)> {
        let mut headers: Vec<(&str, &str)> = Vec::new();
        match &self.evaluation.decision {
            Decision::Allow(allow) => {
                headers.extend(allow.set_headers.iter().map(|h| (h.name.as_str(), h.value.as_str())));
                headers.extend(self.identity.iter().map(|(n, v)| (n.as_str(), v.as_str())));
            }
            Decision::Deny(deny) => {
                headers.extend(deny.headers.iter().map(|h| (h.name.as_str(), h.value.as_str())));
                if deny.status == 401 && !deny.headers.iter().any(|h| h.name.eq_ignore_ascii_case("www-authenticate")) {
                    headers.push(("www-authenticate", "Bearer"));
                }
                headers.push(("x-sandgate-reason", &deny.reason));
            }
        }
        headers.push(("x-sandgate-request-id", &self.request_id));
        headers
    }
}
