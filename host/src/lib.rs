//! Sandgate: an authorization sidecar that runs each request's policy in a fresh WebAssembly
//! sandbox.
//!
//! - [`runtime`]: compiles policy components once and evaluates every check in a new instance
//!   with time and memory limits; any failure is a deny with its own reason code.
//! - [`host_calls`]: what a policy may call (log, read-only data, JWT verification).
//! - [`request`]: building check requests from their JSON form (`sandgate eval`, fixtures).
//! - [`policy_build`]: turning a policy crate into a validated component (`sandgate build`),
//!   with [`import_shim`] folding `wit-component`'s import shim into the policy module.
//! - [`server`]: the forward-auth HTTP server (`sandgate serve`), with [`keys`] (JWT
//!   verification), [`jwks_fetcher`], [`snapshot`], [`metrics`] and [`config`]; [`grpc`] (Envoy
//!   ext_authz over gRPC) and [`admin`] (hot-loading) share them.

pub mod admin;
pub mod bindings;
pub mod config;
pub mod demo;
pub mod fixture_runner;
pub mod grpc;
pub mod host_calls;
pub mod import_shim;
pub mod jwks_fetcher;
pub mod keys;
pub mod metrics;
pub mod policy_build;
pub mod request;
pub mod runtime;
pub mod scaffold;
pub mod server;
pub mod snapshot;
pub mod token_cache;

pub use runtime::{EvalContext, Evaluation, LoadError, PolicyFault, PolicyModule, Runtime, RuntimeConfig};
