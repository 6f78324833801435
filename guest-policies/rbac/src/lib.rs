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
//!
//! `prepare` parses every role's rules once per data version; a check then only looks its
//! roles up. Without it (before the host has prepared this data version) a check reads and
//! parses the rules of its own roles, and decides the same.

use sandgate_policy_sdk::{Decision, DecisionExt, Policy, Request, allow, deny, host, match_path};
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::OnceLock;

/// Every role's rules, parsed by `prepare`: `None` unless the host prepared this data version.
static PREPARED: OnceLock<HashMap<String, Vec<Rule<'static>>>> = OnceLock::new();

/// One permission of a role. Borrowed from the data text where it can be: the policy reads it
/// once per check and never keeps it.
#[derive(Deserialize)]
pub struct Rule<'a> {
    /// Methods this rule permits; `*` for any.
    #[serde(borrow)]
    pub methods: Vec<Cow<'a, str>>,
    /// Path patterns this rule permits.
    #[serde(borrow)]
    pub paths: Vec<Cow<'a, str>>,
}

impl Rule<'_> {
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
        // The subject and roles alone: reading the whole credential costs more.
        let Some(subject) = request.subject() else { return deny(401, "missing_credential") };
        let roles = request.roles();
        let permits = |rules: &[Rule]| rules.iter().any(|rule| rule.permits(request.method(), request.path()));
        let permitted = roles.iter().any(|role| match PREPARED.get() {
            Some(roles) => roles.get(role.as_str()).is_some_and(|rules| permits(rules)),
            None => {
                let Some(text) = host::data_get(&role_pointer(role)) else { return false };
                permits(&serde_json::from_str::<Vec<Rule>>(&text).unwrap_or_default())
            }
        });
        if permitted {
            allow().set_header("x-user", subject).set_header("x-roles", &roles.join(","))
        } else {
            deny(403, "forbidden").message(&format!("no role permits {} {}", request.method(), request.path()))
        }
    }

    /// Parse every role's rules, as a check would parse its own roles' (rules that do not
    /// parse are no rules). Only an object of roles is prepared: under an array, `/roles/0`
    /// names an element, which a lookup by name would not find.
    fn prepare() -> bool {
        let Some(text) = host::data_get("/roles") else { return false };
        let Ok(serde_json::Value::Object(roles)) = serde_json::from_str(&text) else { return false };
        let parsed = roles
            .into_iter()
            .map(|(role, rules)| (role, Vec::<Rule<'static>>::deserialize(rules).unwrap_or_default()))
            .collect();
        PREPARED.set(parsed).is_ok()
    }
}

/// The JSON pointer (RFC 6901) of a role's rules: `/roles/<role>`, the role escaped.
fn role_pointer(role: &str) -> String {
    let mut pointer = String::with_capacity(7 + role.len());
    pointer.push_str("/roles/");
    for c in role.chars() {
        match c {
            '~' => pointer.push_str("~0"),
            '/' => pointer.push_str("~1"),
            c => pointer.push(c),
        }
    }
    pointer
}

sandgate_policy_sdk::export_policy!(Rbac);

#[cfg(test)]
mod tests {
    #[test]
    fn fixtures() {
        sandgate_policy_sdk::testing::run_fixtures::<super::Rbac>(include_str!("../fixtures.json"));
    }
}
