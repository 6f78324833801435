//! Allows every request with `x-policy-version` naming the build that answered: built twice,
//! with `SANDGATE_FIXTURE_VERSION=1` and `=2`, for the hot-reload tests.

use sandgate_policy_sdk::{Decision, DecisionExt, Policy, Request, allow};

const VERSION: &str = match option_env!("SANDGATE_FIXTURE_VERSION") {
    Some(v) => v,
    None => "1",
};

/// The versioned policy.
pub struct Versioned;

impl Policy for Versioned {
    fn check(_request: &Request) -> Decision {
        allow().set_header("x-policy-version", VERSION)
    }
}

sandgate_policy_sdk::export_policy!(Versioned);
