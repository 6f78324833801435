//! Allows every request without looking at it: the cost of the sandbox alone, for the load
//! benchmark. Never deploy it.

use sandgate_policy_sdk::{Decision, Policy, Request, allow};

/// The allow-all policy.
pub struct AllowAll;

impl Policy for AllowAll {
    fn check(_request: &Request) -> Decision {
        allow()
    }
}

sandgate_policy_sdk::export_policy!(AllowAll);
