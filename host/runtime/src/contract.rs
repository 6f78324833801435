//! The rules every decision must follow before the host acts on it: bounded size, valid header
//! names and values, no framing headers, a 4xx/5xx deny with a reason code. A decision that
//! breaks them is a deny ([`PolicyFault::MalformedDecision`] or
//! [`PolicyFault::DecisionTooLarge`]). The server applies the same header-value rule to the
//! identity headers it builds from claims.

use crate::PolicyFault;
use crate::bindings::sandgate::policy::types::{Decision, Header};

/// Bounds on a decision, so a policy cannot make the host build giant responses.
const MAX_HEADERS: usize = 64;
const MAX_HEADER_BYTES: usize = 8 << 10;
const MAX_DECISION_BYTES: usize = 64 << 10;
const MAX_REASON_LEN: usize = 64;

pub(crate) fn validate_decision(decision: Decision) -> Result<Decision, PolicyFault> {
    let (headers, removed, text): (&[Header], &[String], &[&str]) = match &decision {
        Decision::Allow(a) => (&a.set_headers, &a.remove_headers, &[]),
        Decision::Deny(d) => (&d.headers, &[], &[d.message.as_str(), d.reason.as_str()]),
    };
    let total: usize = headers.iter().map(|h| h.name.len() + h.value.len()).sum::<usize>()
        + removed.iter().map(String::len).sum::<usize>()
        + text.iter().map(|t| t.len()).sum::<usize>();
    if headers.len() + removed.len() > MAX_HEADERS || total > MAX_DECISION_BYTES {
        return Err(PolicyFault::DecisionTooLarge(format!(
            "{} headers, {total} bytes (limits: {MAX_HEADERS} headers, {MAX_DECISION_BYTES} bytes)",
            headers.len() + removed.len()
        )));
    }
    for header in headers {
        if !is_header_name(&header.name) {
            return Err(PolicyFault::MalformedDecision(format!("invalid header name {:?}", header.name)));
        }
        if is_framing_header(&header.name) {
            return Err(PolicyFault::MalformedDecision(format!("a policy may not set `{}`", header.name)));
        }
        if header.value.len() > MAX_HEADER_BYTES || !is_header_value(&header.value) {
            return Err(PolicyFault::MalformedDecision(format!("invalid value for header `{}`", header.name)));
        }
    }
    if let Some(name) = removed.iter().find(|n| !is_header_name(n)) {
        return Err(PolicyFault::MalformedDecision(format!("invalid header name to remove {name:?}")));
    }
    if let Decision::Deny(d) = &decision {
        if !(400..=599).contains(&d.status) {
            return Err(PolicyFault::MalformedDecision(format!("deny status {} is not 4xx or 5xx", d.status)));
        }
        if !is_reason_code(&d.reason) {
            return Err(PolicyFault::MalformedDecision(format!(
                "reason {:?} is not a code like `forbidden`",
                d.reason
            )));
        }
    }
    Ok(decision)
}

/// An HTTP header name (RFC 9110 token), as a policy must give it.
fn is_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Headers that frame the HTTP exchange between the proxy and Sandgate (or route it): a
/// policy that could set them could smuggle a second response onto the proxy's connection.
fn is_framing_header(name: &str) -> bool {
    const FRAMING: [&str; 9] = [
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        "host",
    ];
    FRAMING.iter().any(|f| f.eq_ignore_ascii_case(name))
}

/// A header value: visible ASCII, spaces, tabs and non-ASCII bytes; no other control byte.
pub fn is_header_value(value: &str) -> bool {
    value.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// A reason code: 1 to 64 of `[a-z0-9_.-]`.
fn is_reason_code(reason: &str) -> bool {
    (1..=MAX_REASON_LEN).contains(&reason.len())
        && reason.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bindings::sandgate::policy::types::{AllowResponse, DenyResponse};

    fn allow_with(headers: Vec<Header>) -> Decision {
        Decision::Allow(AllowResponse { set_headers: headers, remove_headers: vec![] })
    }

    #[test]
    fn decisions_are_validated() {
        let ok = allow_with(vec![Header { name: "x-user".into(), value: "alice".into() }]);
        assert!(validate_decision(ok).is_ok());
        let crlf = allow_with(vec![Header { name: "x-user".into(), value: "a\r\nx-admin: 1".into() }]);
        assert!(matches!(validate_decision(crlf), Err(PolicyFault::MalformedDecision(_))));
        let bad_name = allow_with(vec![Header { name: "x user".into(), value: "a".into() }]);
        assert!(matches!(validate_decision(bad_name), Err(PolicyFault::MalformedDecision(_))));
        for framing in ["Content-Length", "transfer-encoding", "connection", "host"] {
            let smuggle = allow_with(vec![Header { name: framing.into(), value: "0".into() }]);
            assert!(matches!(validate_decision(smuggle), Err(PolicyFault::MalformedDecision(_))), "{framing}");
        }
        let control = allow_with(vec![Header { name: "x-user".into(), value: "a\u{1b}b".into() }]);
        assert!(matches!(validate_decision(control), Err(PolicyFault::MalformedDecision(_))));
        let many = allow_with((0..65).map(|i| Header { name: format!("x-{i}"), value: "v".into() }).collect());
        assert!(matches!(validate_decision(many), Err(PolicyFault::DecisionTooLarge(_))));
        let deny = |status, reason: &str| {
            Decision::Deny(DenyResponse { status, reason: reason.into(), message: String::new(), headers: vec![] })
        };
        assert!(validate_decision(deny(403, "forbidden")).is_ok());
        assert!(matches!(validate_decision(deny(200, "forbidden")), Err(PolicyFault::MalformedDecision(_))));
        assert!(matches!(validate_decision(deny(403, "Forbidden!")), Err(PolicyFault::MalformedDecision(_))));
    }
}
