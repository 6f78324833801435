//! The Sandgate policy SDK: write an authorization policy as one Rust function.
//!
//! ```ignore
//! use sandgate_policy_sdk::{allow, deny, Decision, Policy, Request, DecisionExt};
//!
//! struct AdminsOnly;
//!
//! impl Policy for AdminsOnly {
//!     fn check(request: &Request) -> Decision {
//!         match request.subject() {
//!             Some(me) if request.has_role("admin") => allow().set_header("x-user", me),
//!             Some(_) => deny(403, "forbidden"),
//!             None => deny(401, "unauthenticated"),
//!         }
//!     }
//! }
//!
//! sandgate_policy_sdk::export_policy!(AdminsOnly);
//! ```
//!
//! Build it with `sandgate build` (it compiles to `wasm32-unknown-unknown` and wraps the module
//! as a component of the `sandgate:policy/authorizer` world), or for `wasm32-wasip2` with
//! `sandgate build --target wasm32-wasip2` (the host links the standard library's WASI
//! deny-all). The same code runs natively under
//! `cargo test`, where the host imports are served by [`testing`] instead of the host.
//!
//! Every check runs in a fresh instance: statics, caches and thread-locals start empty each
//! time, so there is no state to share between requests, and none to get wrong.
//!
//! A [`Request`] reads each part of the request from the host the first time the policy asks
//! for it (contract 0.2.0's `request` interface) and keeps it for the rest of the check: a
//! policy that never looks at the headers or the body does not pay to copy them.

#[cfg(target_arch = "wasm32")]
mod bump_allocator;
mod path;
mod request;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use path::{match_path, match_path_ignore_case};
pub use request::{Request, RequestParts};

/// Bindings generated from `wit/policy.wit` (the `prepared-authorizer` world: every policy built
/// with the SDK exports `prepare`, which answers [`Policy::prepare`]). Policies rarely need
/// them directly.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "prepared-authorizer",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "__export_authorizer",
        default_bindings_module: "sandgate_policy_sdk::bindings",
    });
}

pub use bindings::sandgate::policy::host::LogLevel;
pub use bindings::sandgate::policy::types::{
    AllowResponse, Credential, CredentialError, Decision, DenyResponse, Header, Principal, SnapshotVersions,
    StandardClaims, VerifiedCredential,
};

/// An authorization policy: one function from a request to a decision.
pub trait Policy {
    /// Decide on `request`. Panicking is a deny (`policy_panicked`), but a clear [`deny`] is
    /// kinder to whoever reads the decision log.
    fn check(request: &Request) -> Decision;

    /// Work to do once per version of the data document instead of in every check, typically
    /// parsing the data into a `static` (a [`std::sync::OnceLock`]) that `check` then reads.
    /// The host calls it in an instance of its own and, when it returns `true`, starts every
    /// check on that data version from that instance's memory (copy-on-write: a check still
    /// writes only its own copy). The default does nothing and returns `false`.
    ///
    /// Here only [`host::data_get`] answers from the data; the request is empty (see the
    /// `prepare` interface in `wit/policy.wit`). `check` must decide the same whether or not
    /// `prepare` ran, because a check may start before preparation is done: keep the parsed
    /// form a cache of what `check` would otherwise read itself.
    fn prepare() -> bool {
        false
    }
}

/// Export a [`Policy`] implementation as this component's `check`. Use once per crate.
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct SandgateExport;
            impl $crate::bindings::exports::sandgate::policy::policy::Guest for SandgateExport {
                fn check() -> $crate::Decision {
                    <$policy as $crate::Policy>::check(&$crate::Request::from_host())
                }
            }
            impl $crate::bindings::exports::sandgate::policy::prepare::Guest for SandgateExport {
                fn prepare() -> bool {
                    <$policy as $crate::Policy>::prepare()
                }
            }
    $crate::bindings::__export_authorizer!(SandgateExport with_types_in $crate::bindings);
        };
    };
}

/// Allow the request, setting no headers. Add some with [`DecisionExt::set_header`].
pub fn allow() -> Decision {
    Decision::Allow(AllowResponse { set_headers: Vec::new(), remove_headers: Vec::new() })
}

/// Deny the request with `status` (e.g. 401, 403) and a machine-readable `reason` code, which
/// is also the message until [`DecisionExt::message`] sets one.
pub fn deny(status: u16, reason: &str) -> Decision {
    Decision::Deny(DenyResponse {
        status,
        reason: reason.to_owned(),
        message: reason.replace('_', " "),
        headers: Vec::new(),
    })
}

/// Builder methods on a [`Decision`].
pub trait DecisionExt {
    /// On an allow, set this header on the upstream request; on a deny, add it to the denial.
    fn set_header(self, name: &str, value: &str) -> Self;
    /// On an allow, remove this header from the upstream request; no effect on a deny.
    fn remove_header(self, name: &str) -> Self;
    /// On a deny, the human-readable message (sent as the body); no effect on an allow.
    fn message(self, message: &str) -> Self;
    /// Whether this is an allow.
    fn is_allow(&self) -> bool;
}

impl DecisionExt for Decision {
    fn set_header(mut self, name: &str, value: &str) -> Self {
        let header = Header { name: name.to_ascii_lowercase(), value: value.to_owned() };
        match &mut self {
            Decision::Allow(a) => a.set_headers.push(header),
            Decision::Deny(d) => d.headers.push(header),
        }
        self
    }

    fn remove_header(mut self, name: &str) -> Self {
        if let Decision::Allow(a) = &mut self {
            a.remove_headers.push(name.to_ascii_lowercase());
        }
        self
    }

    fn message(mut self, message: &str) -> Self {
        if let Decision::Deny(d) = &mut self {
            d.message = message.to_owned();
        }
        self
    }

    fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }
}

/// Calls to the host. Natively (under `cargo test`) these are served by [`testing`].
pub mod host {
    use super::*;

    /// Add a line to this check's decision log entry.
    pub fn log(level: LogLevel, message: &str) {
        #[cfg(target_arch = "wasm32")]
        bindings::sandgate::policy::host::log(level, message);
        #[cfg(not(target_arch = "wasm32"))]
        crate::testing::log(level, message);
    }

    /// The JSON text at `pointer` (RFC 6901, e.g. `/roles/admin`) in the policy's data document.
    pub fn data_get(pointer: &str) -> Option<String> {
        #[cfg(target_arch = "wasm32")]
        return bindings::sandgate::policy::host::data_get(pointer);
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::data_get(pointer);
    }

    /// The value at `pointer` in the data document, parsed; `None` if absent or not JSON of
    /// that shape.
    pub fn data<T: serde::de::DeserializeOwned>(pointer: &str) -> Option<T> {
        serde_json::from_str(&data_get(pointer)?).ok()
    }

    /// Verify a JWT found outside the `Authorization` header with the host's issuers and keys.
    pub fn verify_jwt(token: &str) -> Result<VerifiedCredential, CredentialError> {
        #[cfg(target_arch = "wasm32")]
        return bindings::sandgate::policy::host::verify_jwt(token);
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::verify_jwt(token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_claims_json(json: &str) -> Request {
        let spec: sandgate_spec::RequestSpec =
            serde_json::from_value(serde_json::json!({ "path": "/", "claims": { "iss": "i" } })).unwrap();
        let mut parts = testing::parts_from_spec(&spec, 0);
        let Credential::Verified(credential) = &mut parts.credential else { panic!("verified") };
        credential.claims_json = json.to_owned();
        Request::from_parts(parts)
    }

    #[test]
    fn claims_are_found_by_name() {
        let request = with_claims_json(
            r#"{"a":1,"tenant":"acme","nested":{"tenant":"no"},"t\u0065nant2":[1,{"x":null}],"dup":1,"dup":2}"#,
        );
        assert_eq!(request.claim("tenant"), Some(serde_json::json!("acme")));
        assert_eq!(request.claim("tenant2"), Some(serde_json::json!([1, { "x": null }])));
        assert_eq!(request.claim("dup"), Some(serde_json::json!(2)));
        assert_eq!(request.claim("x"), None);
        assert_eq!(with_claims_json("[1]").claim("a"), None);
        assert_eq!(with_claims_json("{\"a\":").claim("a"), None);
    }
}
