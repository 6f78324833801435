//! Tooling for policy authors, off the request path: only the `sandgate` binary depends on it.
//!
//! - [`policy_build`]: a policy crate → a validated component (`sandgate build`), with
//!   [`import_shim`] folding `wit-component`'s import shim into the policy module.
//! - [`scaffold`]: a new policy crate (`sandgate new`).
//! - [`fixture_runner`]: a fixture file's cases through the real runtime (`sandgate test`).

pub mod fixture_runner;
pub mod import_shim;
pub mod policy_build;
pub mod scaffold;
