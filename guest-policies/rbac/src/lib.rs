//! Role-based access from a data document.
//!
//! The token's `roles` claim names roles; the data document says what each role may do:
//!
//! ```json
//! { "roles": {
//!     "reader": [{ "methods": ["GET", "HEAD"], "paths": ["/api/**"] }],
//!     "admin":  [{ "methods": ["*"], "paths": ["/**"] }] } }
//! ```
//!
//! A request is allowed when any rule of any of the caller's roles matches its method and
//! path (see [`sandgate_policy_sdk::match_path`] for patterns). The upstream receives
//! `x-user` (the subject) and `x-roles`. No credential, or a rejected one: 401. Authenticated
//! but no matching rule: 403 `forbidden`.

use sandgate_policy_sdk::{allow, deny, host, match_path, Decision, DecisionExt, Policy, Request, RequestExt};
use serde::Deserialize;

/// One permission of a role.
#[derive(Deserialize)]
pub struct Rule {
    /// Methods this rule permits; `*` for any.
    pub methods: Vec<String>,
    /// Path patterns this rule permits.
    pub paths: Vec<String>,
}

impl Rule {
    fn permits(&self, method: &str, path: &str) -> bool {
        self.methods.iter().any(|m| m == "*" || m.eq_ignore_ascii_case(method))
            && self.paths.iter().any(|p| match_path(p, path).is_some())
    }
}

/// The RBAC policy.
pub struct Rbac;

impl Policy for Rbac {
    fn check(request: &Request) -> Decision {
        if let Some(denial) = request.unauthenticated() {
            return denial;
        }
        let Some(claims) = request.claims() else { return deny(401, "missing_credential") };
        let permitted = claims.roles.iter().any(|role| {
            let rules: Vec<Rule> = host::data(&format!("/roles/{}", escape_pointer(role))).unwrap_or_default();
            rules.iter().any(|rule| rule.permits(&request.method, &request.path))
        });
        if permitted {
            allow().set_header("x-user", &claims.subject).set_header("x-roles", &claims.roles.join(","))
        } else {
            deny(403, "forbidden").message(&format!("no role permits {} {}", request.method, request.path))
        }
    }
}

/// Escape a key for use in a JSON pointer (RFC 6901).
fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

sandgate_policy_sdk::export_policy!(Rbac);

#[cfg(test)]
mod tests {
    #[test]
    fn fixtures() {
        sandgate_policy_sdk::testing::run_fixtures::<super::Rbac>(include_str!("../fixtures.json"));
    }
}
