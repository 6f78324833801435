//! Tenant isolation: a caller reaches only its own tenant's resources.
//!
//! Paths under `/tenants/{id}/…` are allowed only when `{id}` equals the token's `tenant`
//! claim; `tenants` is matched ignoring case, as a case-insensitive upstream would serve
//! `/Tenants/{id}`. Roles listed in the data document's `cross_tenant_roles` (e.g. platform operators)
//! may reach every tenant; the decision log notes each such access. Paths outside `/tenants/`
//! need only a verified credential. The upstream receives `x-user` and `x-tenant`.
//!
//! ```json
//! { "cross_tenant_roles": ["platform-admin"] }
//! ```
//!
//! `prepare` reads the cross-tenant roles once per data version; without it (before the host
//! has prepared this data version) a check that needs them reads them itself, and decides the
//! same.

use sandgate_policy_sdk::{
    Decision, DecisionExt, LogLevel, Policy, Request, allow, deny, host, match_path_ignore_case,
};
use std::sync::OnceLock;

/// The data document's `cross_tenant_roles`, read by `prepare`: `None` unless the host
/// prepared this data version.
static CROSS_TENANT_ROLES: OnceLock<Vec<String>> = OnceLock::new();

/// The roles that may reach every tenant (none if the document has no such list).
fn cross_tenant_roles() -> Vec<String> {
    host::data("/cross_tenant_roles").unwrap_or_default()
}

/// The tenant isolation policy.
pub struct TenantIsolation;

impl Policy for TenantIsolation {
    fn check(request: &Request) -> Decision {
        if let Some(denial) = request.unauthenticated() {
            return denial;
        }
        // The subject, roles and tenant alone: reading the whole credential costs more.
        let Some(subject) = request.subject() else { return deny(401, "missing_credential") };
        let own_tenant = request.claim("tenant").and_then(|t| t.as_str().map(str::to_owned));
        let granted = |tenant: &str| allow().set_header("x-user", subject).set_header("x-tenant", tenant);

        let Some(captures) = match_path_ignore_case("/tenants/{id}/**", request.path()) else {
            return granted(own_tenant.as_deref().unwrap_or(""));
        };
        let wanted = captures[0].1;
        if own_tenant.as_deref() == Some(wanted) {
            return granted(wanted);
        }
        let read;
        let cross = match CROSS_TENANT_ROLES.get() {
            Some(prepared) => prepared,
            None => {
                read = cross_tenant_roles();
                &read
            }
        };
        if let Some(role) = request.roles().iter().find(|r| cross.contains(r)) {
            host::log(LogLevel::Info, &format!("cross-tenant access to `{wanted}` by `{subject}` as `{role}`"));
            return granted(wanted);
        }
        match own_tenant {
            None => deny(403, "missing_tenant").message("the token has no tenant claim"),
            Some(_) => deny(403, "wrong_tenant").message("the token belongs to another tenant"),
        }
    }

    /// Read the cross-tenant roles as a check would.
    fn prepare() -> bool {
        CROSS_TENANT_ROLES.set(cross_tenant_roles()).is_ok()
    }
}

sandgate_policy_sdk::export_policy!(TenantIsolation);

#[cfg(test)]
mod tests {
    #[test]
    fn fixtures() {
        sandgate_policy_sdk::testing::run_fixtures::<super::TenantIsolation>(include_str!("../fixtures.json"));
    }
}
