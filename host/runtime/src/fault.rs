//! What a check produced: an [`Evaluation`] (a decision, never an error) and, when the host
//! decided because the policy failed, the [`PolicyFault`] that says why. Every fault is a deny
//! with its own reason code.

use crate::bindings::sandgate::policy::types::{Decision, DenyResponse};
use crate::host_state::PolicyLog;

/// Why the host, not the policy, decided a check: every one is a deny.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyFault {
    /// The policy ran past its time budget.
    #[error("the policy ran past its time limit")]
    Timeout,
    /// The policy tried to grow memory past its limit.
    #[error("the policy ran out of memory")]
    OutOfMemory,
    /// The policy recursed too deep.
    #[error("the policy overflowed its stack")]
    StackOverflow,
    /// The policy panicked or aborted.
    #[error("the policy panicked")]
    Panicked,
    /// The policy called WASI's `exit` (a `wasm32-wasip2` policy's `std::process::exit`).
    #[error("the policy exited with status {0}")]
    Exited(i32),
    /// Any other trap.
    #[error("the policy trapped: {0}")]
    Trap(String),
    /// The decision was larger than the host accepts.
    #[error("the policy's decision is too large: {0}")]
    DecisionTooLarge(String),
    /// One call into the host, or the decision, would have made the host copy more than
    /// [`MAX_TRANSFER`](crate::MAX_TRANSFER) bytes out of the policy's memory.
    #[error("the policy passed the host more than {} bytes at once", crate::MAX_TRANSFER)]
    TransferTooLarge,
    /// The decision broke the contract (e.g. a deny with status 200, a bad header).
    #[error("the policy's decision is malformed: {0}")]
    MalformedDecision(String),
    /// No instance was free within the queue timeout.
    #[error("no policy instance was free in time")]
    Overloaded,
    /// The host failed to create the instance.
    #[error("the policy could not be instantiated: {0}")]
    Instantiate(String),
}

impl PolicyFault {
    /// The reason code written in the deny and the decision log.
    pub fn reason(&self) -> &'static str {
        match self {
            PolicyFault::Timeout => "policy_timeout",
            PolicyFault::OutOfMemory => "policy_out_of_memory",
            PolicyFault::StackOverflow => "policy_stack_overflow",
            PolicyFault::Panicked => "policy_panicked",
            PolicyFault::Exited(_) => "policy_exited",
            PolicyFault::Trap(_) => "policy_trap",
            PolicyFault::DecisionTooLarge(_) => "policy_decision_too_large",
            PolicyFault::TransferTooLarge => "policy_transfer_too_large",
            PolicyFault::MalformedDecision(_) => "policy_malformed_decision",
            PolicyFault::Overloaded => "overloaded",
            PolicyFault::Instantiate(_) => "policy_instantiation_failed",
        }
    }

    /// The status of the deny: 503 when overloaded (retryable), else 403.
    pub fn status(&self) -> u16 {
        match self {
            PolicyFault::Overloaded => 503,
            _ => 403,
        }
    }
}

/// The result of one evaluation.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// The decision to answer. A fault is always a deny.
    pub decision: Decision,
    /// Set when the host decided (a deny) because the policy failed.
    pub fault: Option<PolicyFault>,
    /// Lines the policy logged, for the decision log.
    pub logs: Vec<PolicyLog>,
    /// How often the guest grew its memory past the initial size (each costs `mprotect`
    /// calls in the host); 0 for a well-behaved policy.
    pub memory_grows: u32,
    /// Whether the check had to wait for a free instance.
    pub queued: bool,
    /// How long instantiating and calling took (zero when the policy never ran).
    pub timings: Timings,
    /// Whether the check started from the policy's memory prepared for its data version
    /// (`prepare`), not from the component as built.
    pub prepared: bool,
}

/// Where a fresh-instance evaluation spent its time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    /// Creating the store and instantiating the component.
    pub instantiate: std::time::Duration,
    /// Calling `check` and lifting its decision.
    pub call: std::time::Duration,
}

impl Evaluation {
    /// An evaluation that answered `decision` without running a policy (a host decision, a
    /// native baseline, a test).
    pub fn decided(decision: Decision) -> Self {
        Evaluation {
            decision,
            fault: None,
            logs: Vec::new(),
            memory_grows: 0,
            queued: false,
            timings: Timings::default(),
            prepared: false,
        }
    }

    pub(crate) fn fault(fault: PolicyFault, logs: Vec<PolicyLog>, memory_grows: u32) -> Self {
        let decision = Decision::Deny(DenyResponse {
            status: fault.status(),
            reason: fault.reason().to_owned(),
            message: "access denied".to_owned(),
            headers: Vec::new(),
        });
        Evaluation {
            decision,
            fault: Some(fault),
            logs,
            memory_grows,
            queued: false,
            timings: Timings::default(),
            prepared: false,
        }
    }

    /// Whether the request is allowed.
    pub fn is_allow(&self) -> bool {
        matches!(self.decision, Decision::Allow(_))
    }

    /// The reason code: the policy's for a deny, `allow` for an allow.
    pub fn reason(&self) -> &str {
        match &self.decision {
            Decision::Allow(_) => "allow",
            Decision::Deny(d) => &d.reason,
        }
    }
}
