//! OAuth scope checks per route.
//!
//! The data document lists routes in order; the first whose method and path match names the
//! scope the token must carry. A request matching no route is denied (`no_route`): new
//! endpoints are closed until someone writes their rule.
//!
//! ```json
//! { "routes": [
//!     { "methods": ["GET"], "path": "/orders/**", "scope": "orders:read" },
//!     { "methods": ["POST", "PUT", "DELETE"], "path": "/orders/**", "scope": "orders:write" } ] }
//! ```
//!
//! A missing scope is answered as RFC 6750 says: 403 with
//! `WWW-Authenticate: Bearer error="insufficient_scope", scope="…"`.

use sandgate_policy_sdk::{Decision, DecisionExt, Policy, Request, allow, deny, host, match_path};
use serde::Deserialize;

/// A route and the scope it requires.
#[derive(Deserialize)]
pub struct Route {
    /// Methods; `*` for any.
    pub methods: Vec<String>,
    /// Path pattern.
    pub path: String,
    /// Required scope.
    pub scope: String,
}

/// The scope policy.
pub struct Scopes;

impl Policy for Scopes {
    fn check(request: &Request) -> Decision {
        if let Some(denial) = request.unauthenticated() {
            return denial;
        }
        let routes: Vec<Route> = host::data("/routes").unwrap_or_default();
        let route = routes.iter().find(|r| {
            r.methods.iter().any(|m| m == "*" || m.eq_ignore_ascii_case(request.method()))
                && match_path(&r.path, request.path()).is_some()
        });
        let Some(route) = route else {
            return deny(403, "no_route").message("no route rule matches this request");
        };
        if !request.has_scope(&route.scope) {
            let challenge = format!("Bearer error=\"insufficient_scope\", scope=\"{}\"", route.scope);
            return deny(403, "insufficient_scope")
                .message(&format!("requires scope `{}`", route.scope))
                .set_header("www-authenticate", &challenge);
        }
        let subject = request.subject().unwrap_or_default();
        allow().set_header("x-user", subject).set_header("x-scope", &route.scope)
    }
}

sandgate_policy_sdk::export_policy!(Scopes);

#[cfg(test)]
mod tests {
    #[test]
    fn fixtures() {
        sandgate_policy_sdk::testing::run_fixtures::<super::Scopes>(include_str!("../fixtures.json"));
    }
}
